"""What a site's labels mean: nnU-Net regions (sigmoid) or classes (softmax), read from dataset.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np


class LabelKind(StrEnum):
    """How output channels relate: nnU-Net regions (nested, one sigmoid each) or classes (one softmax)."""

    REGIONS = "regions"
    CLASSES = "classes"


@dataclass(frozen=True)
class LabelSpec:
    """Output channels of a model and how label maps turn into targets and back."""

    kind: LabelKind  # regions: nested binary channels; classes: one-hot including background
    names: tuple[str, ...]  # one per output channel
    members: tuple[tuple[int, ...], ...]  # label values making up each output channel
    values: tuple[int, ...]  # every label value a label map may contain
    regions_class_order: tuple[int, ...] = ()  # value painted for each region, in order

    @property
    def n_out(self) -> int:
        return len(self.names)

    @property
    def metric_names(self) -> tuple[str, ...]:
        """Channels that Dice/HD95 are reported for (background excluded for classes)."""
        return self.names if self.kind == LabelKind.REGIONS else self.names[1:]

    def to_target(self, label: np.ndarray) -> np.ndarray:
        """Label map [...] -> float32 target [n_out, ...]."""
        return np.stack([np.isin(label, m) for m in self.members]).astype(np.float32)

    def to_label_map(self, probs: np.ndarray) -> np.ndarray:
        """Probabilities [n_out, ...] -> label map with the dataset's own values (uint8)."""
        if self.kind == LabelKind.CLASSES:
            return np.asarray(self.members, dtype=np.int64)[:, 0][probs.argmax(0)].astype(np.uint8)
        out = np.zeros(probs.shape[1:], dtype=np.uint8)
        for channel, value in enumerate(self.regions_class_order):
            out[probs[channel] > 0.5] = value  # nnU-Net paints regions in order, inner last
        return out

    def value_names(self) -> dict[int, str]:
        """What each non-zero value of a label map this spec writes means (regions: the region painted with it)."""
        if self.kind == LabelKind.CLASSES:
            return {m[0]: n for n, m in zip(self.names, self.members) if m[0] != 0}
        return dict(zip(self.regions_class_order, self.names))

    def to_dict(self) -> dict:
        return {"kind": str(self.kind), "names": list(self.names), "members": [list(m) for m in self.members],
                "values": list(self.values), "regions_class_order": list(self.regions_class_order)}

    @staticmethod
    def from_dict(d: dict) -> "LabelSpec":
        return LabelSpec(LabelKind(d["kind"]), tuple(d["names"]), tuple(tuple(m) for m in d["members"]),
                         tuple(d["values"]), tuple(d.get("regions_class_order", ())))

    @staticmethod
    def checked(d) -> "LabelSpec":
        """from_dict for a spec that came from elsewhere (a site's reply): every field's type and range checked;
        ValueError says which is wrong. At most MAX_CHANNELS output channels (the model is built from it)."""
        if not isinstance(d, dict) or d.get("kind") not in {str(k) for k in LabelKind}:
            raise ValueError(f"kind must be one of {', '.join(LabelKind)}")
        names, members = d.get("names"), d.get("members")
        values, order = d.get("values"), d.get("regions_class_order", [])
        if not (isinstance(names, list) and 0 < len(names) <= MAX_CHANNELS
                and all(isinstance(n, str) and 0 < len(n) <= 64 for n in names)):
            raise ValueError(f"names must be 1-{MAX_CHANNELS} names of 1-64 characters")
        if not (isinstance(members, list) and len(members) == len(names)
                and all(isinstance(m, list) and m and all(_label_value(v) for v in m) for m in members)):
            raise ValueError("members must hold one non-empty list of label values (0-255) per name")
        if not (isinstance(values, list) and all(_label_value(v) for v in values)):
            raise ValueError("values must be a list of label values (0-255)")
        if not (isinstance(order, list) and len(order) <= len(names) and all(_label_value(v) for v in order)):
            raise ValueError("regions_class_order must list at most one label value (0-255) per name")
        return LabelSpec.from_dict(d)


MAX_CHANNELS = 32  # output channels a label spec may declare


def _label_value(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255


def label_summary(spec: dict) -> str:
    """A spec as a reader compares two: 'regions whole_tumor=[1, 2, 3], tumor_core=[2, 3]'."""
    return f"{spec['kind']} " + ", ".join(f"{n}={list(m)}" for n, m in zip(spec["names"], spec["members"]))


def contract_labels(path: str | Path) -> dict:
    """The coordinator's label contract (run-config key `labels`): a dataset.json's labels, as sites describe
    theirs; ValueError naming the file when it is unreadable or malformed."""
    try:
        spec = label_spec_from_dataset_json(json.loads(Path(path).read_text()))
    except (OSError, ValueError) as exc:
        raise ValueError(f"labels={path}: {exc}") from None
    return spec.to_dict()


def label_spec_from_dataset_json(meta: dict) -> LabelSpec:
    """Parse the `labels` (and `regions_class_order`) entries; raise ValueError on malformed input."""
    labels = meta.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise ValueError("'labels' must be a non-empty mapping of name -> value or list of values")
    parsed: dict[str, tuple[int, ...]] = {}
    for name, value in labels.items():
        items = value if isinstance(value, list) else [value]
        if not items or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in items):
            raise ValueError(f"label {name!r}: {value!r} is not a non-negative integer or list of them")
        parsed[name] = tuple(items)
    values = tuple(sorted({v for items in parsed.values() for v in items} | {0}))
    if not any(isinstance(v, list) for v in labels.values()):
        order = sorted(parsed.items(), key=lambda kv: kv[1][0])
        return LabelSpec(LabelKind.CLASSES, tuple(n for n, _ in order), tuple(m for _, m in order), values)
    regions = {n: m for n, m in parsed.items() if m != (0,)}
    order = meta.get("regions_class_order")
    if order is None:
        order = [max(m) for m in regions.values()]
    if len(order) != len(regions):
        raise ValueError(f"'regions_class_order' has {len(order)} entries for {len(regions)} regions")
    return LabelSpec(LabelKind.REGIONS, tuple(regions), tuple(regions.values()), values, tuple(int(v) for v in order))
