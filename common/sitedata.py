"""Read one site folder (nnU-Net v2 raw layout): validate every case, skip bad ones with a reason."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import nibabel as nib
import numpy as np
import torch

from common.clinical import ClinicalSchema, parse_schema, read_clinical_csv
from common.config import Config
from common.labels import LabelSpec, label_spec_from_dataset_json
from common.preprocess import case_transform, intensity_stats
from common.wire import site_id_from_name

# Spellings seen in public datasets for the federation's sequence names.
MODALITY_ALIASES = {
    "t1": "T1", "t1w": "T1", "t1n": "T1", "t1native": "T1",
    "t1ce": "T1ce", "t1c": "T1ce", "t1gd": "T1ce", "t1post": "T1ce", "t1contrast": "T1ce",
    "t2": "T2", "t2w": "T2",
    "flair": "FLAIR", "t2flair": "FLAIR", "t2f": "FLAIR",
}


def site_id(index: int) -> str:
    """Default site names, as `mome synth` names its folders: 0 -> 'site-a', 25 -> 'site-z', 26 -> 'site-aa'."""
    name, n = "", index + 1
    while n:
        n, r = divmod(n - 1, 26)
        name = chr(97 + r) + name
    return f"site-{name}"


def find_site_dirs(root: Path | str) -> list[Path]:
    """The site folders of a federation's data folder: its sub-folders holding a dataset.json, by name."""
    root = Path(root)
    if not root.is_dir():
        raise SiteDataError(f"{root}: not a folder")
    return sorted(p for p in root.iterdir() if (p / "dataset.json").is_file())


class SiteDataError(Exception):
    """The site folder as a whole cannot be used (names the file and the reason)."""


@dataclass
class SiteReport:
    """What check-data prints: usable and skipped cases, modalities, warnings."""

    site_dir: Path
    usable: dict[str, list[str]] = field(default_factory=lambda: {"Tr": [], "Ts": []})
    unlabelled: list[str] = field(default_factory=list)  # held-out cases without a label file
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (case, file, reason)
    warnings: list[str] = field(default_factory=list)
    modalities: list[str] = field(default_factory=list)
    clinical: bool = False

    @property
    def n_labelled_test(self) -> int:
        return len(self.usable["Ts"]) - len(self.unlabelled)

    def skip(self, case: str, path: Path, reason: str) -> None:
        self.skipped.append((case, str(path), reason))

    def format(self) -> str:
        lines = [f"site {self.site_dir}",
                 f"  modalities: {', '.join(self.modalities) or 'none'}"
                 f"{' + clinical' if self.clinical else ''}",
                 f"  usable: {len(self.usable['Tr'])} training, {len(self.usable['Ts'])} held-out "
                 f"({self.n_labelled_test} labelled, {len(self.unlabelled)} unlabelled)",
                 f"  skipped: {len(self.skipped)}"]
        lines += [f"    {case}: {path}: {reason}" for case, path, reason in self.skipped]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


@dataclass(frozen=True)
class SiteLayout:
    """The parsed dataset.json of a site, mapped onto the federation vocabulary."""

    site_dir: Path
    label_spec: LabelSpec
    channel_modality: dict[int, int]  # file channel index -> vocabulary index
    file_ending: str
    missing: dict[str, set[int]]  # case -> declared absent channel indices
    max_voxels: int = Config.max_voxels  # a NIfTI whose header declares more is refused before its data are read


def read_layout(site_dir: Path, cfg: Config, report: SiteReport) -> SiteLayout:
    """Parse dataset.json; raise SiteDataError naming the file when it is unusable."""
    path = site_dir / "dataset.json"
    if not site_dir.is_dir():
        raise SiteDataError(f"{site_dir}: not a folder")
    if not path.is_file():
        raise SiteDataError(f"{path}: missing (every site needs a dataset.json)")
    try:
        meta = json.loads(path.read_text())
        if not isinstance(meta, dict):
            raise ValueError("top level is not an object")
        spec = label_spec_from_dataset_json(meta)
        names = meta.get("channel_names")
        if not isinstance(names, dict) or not names:
            raise ValueError("'channel_names' must be a non-empty mapping like {\"0\": \"T1\"}")
        channels = {int(k): str(v) for k, v in names.items()}
        missing = {c: {_channel_index(channels, n) for n in v}
                   for c, v in dict(meta.get("missing_channels", {})).items()}
    except (ValueError, TypeError, KeyError) as exc:
        raise SiteDataError(f"{path}: malformed dataset.json: {exc}") from exc
    vocab = cfg.modality_names
    mapping = {}
    for index, name in sorted(channels.items()):
        canonical = MODALITY_ALIASES.get(re.sub(r"[^a-z0-9]", "", name.lower()), name)
        if canonical in vocab:
            mapping[index] = vocab.index(canonical)
        else:
            report.warnings.append(f"{path}: channel {index} {name!r} is not in the vocabulary "
                                   f"{','.join(vocab)}; ignored")
    if not mapping:
        raise SiteDataError(f"{path}: no channel maps onto the vocabulary {','.join(vocab)}")
    report.modalities = [vocab[m] for m in sorted(mapping.values())]
    return SiteLayout(site_dir, spec, mapping, str(meta.get("file_ending", ".nii.gz")), missing, cfg.max_voxels)


def _channel_index(channels: dict[int, str], name: str | int) -> int:
    if isinstance(name, int) or str(name).isdigit():
        return int(name)
    for index, value in channels.items():
        if value == name:
            return index
    raise ValueError(f"missing_channels names unknown channel {name!r}")


def channel_file(file_ending: str) -> re.Pattern:
    """nnU-Net's image file name: <case>_<cccc><file_ending>, cccc the channel index."""
    return re.compile(rf"^(.+)_(\d{{4}}){re.escape(file_ending)}$")


def case_ids(paths: Iterable[Path], file_ending: str) -> list[str]:
    """The case ids among image file names (files named otherwise are not cases)."""
    pattern = channel_file(file_ending)
    return sorted({m.group(1) for p in paths if (m := pattern.match(p.name))})


def discover_cases(layout: SiteLayout, split: str) -> list[str]:
    """Case ids found in images<split>/."""
    folder = layout.site_dir / f"images{split}"
    return case_ids(folder.iterdir(), layout.file_ending) if folder.is_dir() else []


def _read_volume(path: Path, max_voxels: int) -> tuple[np.ndarray, np.ndarray]:
    """Load a NIfTI fully (so truncation shows now), float32 data and affine; an oversized one is never read."""
    try:
        img = nib.load(str(path))  # the header only: what it declares is checked before anything is allocated
        voxels = int(np.prod(img.header.get_data_shape(), dtype=object))  # Python ints: no int64 wrap-around
        data = np.asarray(img.dataobj, dtype=np.float32) if voxels <= max_voxels else None
    except Exception as exc:  # nibabel raises many types for broken files
        raise ValueError(f"unreadable or truncated NIfTI ({type(exc).__name__}: {exc})") from exc
    if data is None:
        raise ValueError(f"header declares {voxels} voxels, above max-voxels {max_voxels}")
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {data.shape}")
    if not np.isfinite(data).all():
        raise ValueError(f"{int((~np.isfinite(data)).sum())} NaN/inf voxels")
    return data, img.affine


class BadCase(Exception):
    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def read_case(layout: SiteLayout, case: str, split: str, n_modalities: int, with_label: bool,
              image_dir: Path | None = None, allow_missing: bool = False) -> dict:
    """Raw arrays of one case in vocabulary channel order; raise BadCase on the first problem.

    allow_missing: any channel may be absent (prediction on whatever sequences a case has)."""
    image_dir = image_dir or layout.site_dir / f"images{split}"
    image = None
    present = np.zeros(n_modalities, dtype=np.float32)
    shape = affine = None
    for channel, modality in layout.channel_modality.items():
        path = image_dir / f"{case}_{channel:04d}{layout.file_ending}"
        if not path.exists():
            if allow_missing or channel in layout.missing.get(case, set()):
                continue
            raise BadCase(path, "missing channel file (not declared in missing_channels)")
        try:
            data, aff = _read_volume(path, layout.max_voxels)
        except ValueError as exc:
            raise BadCase(path, str(exc)) from None
        if shape is None:
            shape, affine = data.shape, aff
            image = np.zeros((n_modalities, *shape), dtype=np.float32)
        elif data.shape != shape:
            raise BadCase(path, f"shape {data.shape} differs from the case's other channels {shape}")
        elif not np.allclose(aff, affine, atol=1e-3):
            raise BadCase(path, "affine differs from the case's other channels")
        image[modality], present[modality] = data, 1.0
    if image is None:
        raise BadCase(image_dir, f"case {case} has no usable channel")
    out = {"case_id": case, "raw_image": image, "present": present, "affine": affine, "shape": shape}
    if with_label:
        out["label"] = _read_label(layout, case, split, shape, affine)
    return out


def label_path(layout: SiteLayout, case: str, split: str) -> Path:
    return layout.site_dir / f"labels{split}" / f"{case}{layout.file_ending}"


def _read_label(layout: SiteLayout, case: str, split: str, shape, affine) -> np.ndarray:
    path = label_path(layout, case, split)
    if not path.exists():
        raise BadCase(path, "missing label file")
    try:
        label, aff = _read_volume(path, layout.max_voxels)
    except ValueError as exc:
        raise BadCase(path, str(exc)) from None
    if label.shape != shape:
        raise BadCase(path, f"label shape {label.shape} differs from image shape {shape}")
    if not np.allclose(aff, affine, atol=1e-3):
        raise BadCase(path, "label affine differs from the image affine")
    found = set(np.unique(label).tolist())
    undeclared = sorted(found - set(layout.label_spec.values))
    if undeclared:
        raise BadCase(path, f"label values {undeclared} not declared in dataset.json "
                            f"(allowed {list(layout.label_spec.values)})")
    return label.astype(np.int16)


@dataclass
class SiteData:
    """A site's usable cases, preprocessed to tensors, plus what was skipped and why."""

    site_dir: Path
    label_spec: LabelSpec
    report: SiteReport
    train: list[dict]
    test: list[dict]  # held-out cases; those with a label file carry "label"

    @property
    def site_id(self) -> str:
        return site_id_from_name(self.site_dir.name)

    @property
    def labelled_test(self) -> list[dict]:
        return [c for c in self.test if "label" in c]

    @property
    def unlabelled_test(self) -> list[dict]:
        return [c for c in self.test if "label" not in c]


def _read_clinical(site_dir: Path, report: SiteReport) -> dict[str, dict[str, str]]:
    path = site_dir / "clinical.csv"
    if not path.exists():
        return {}
    try:
        rows = read_clinical_csv(path)
    except (OSError, ValueError, UnicodeDecodeError, KeyError) as exc:
        report.warnings.append(f"{path}: unreadable ({exc}); clinical modality treated as absent")
        return {}
    report.clinical = bool(rows)
    return rows


def preprocess_case(raw: dict, cfg: Config, schema: ClinicalSchema, row: dict | None,
                spec: LabelSpec) -> dict:
    data = {"image": raw["raw_image"]}
    if "label" in raw:
        data["label"] = raw["label"][None].astype(np.float32)
    data = case_transform(cfg.size)(data)
    clinical, _ = schema.encode(row) if row is not None else ([0.0] * schema.width, [])
    case = {
        "case_id": raw["case_id"], "affine": raw["affine"], "shape": raw["shape"],
        "image": torch.as_tensor(np.asarray(data["image"]), dtype=torch.float32),
        "presence": torch.tensor([*raw["present"], 1.0 if row is not None else 0.0]),
        "clinical": torch.tensor(clinical, dtype=torch.float32),
        "stats": torch.from_numpy(intensity_stats(raw["raw_image"], raw["present"])),
    }
    if "label" in data:
        case["label"] = torch.from_numpy(spec.to_target(np.asarray(data["label"])[0]))
    return case


def load_site(site_dir: Path | str, cfg: Config) -> SiteData:
    """Validate and load every case; bad cases are skipped and reported, nothing is written.

    A held-out case is labelled when labelsTs/ holds its label file; a hospital's held-out cases usually have none,
    and a site may have some of each."""
    site_dir = Path(site_dir)
    report = SiteReport(site_dir)
    layout = read_layout(site_dir, cfg, report)
    schema = parse_schema(cfg.clinical_fields)
    rows = _read_clinical(site_dir, report)
    splits: dict[str, list[dict]] = {"Tr": [], "Ts": []}
    for split in splits:
        for case in discover_cases(layout, split):
            with_label = split == "Tr" or label_path(layout, case, split).exists()
            try:
                raw = read_case(layout, case, split, len(cfg.modality_names), with_label)
            except BadCase as bad:
                report.skip(case, bad.path, bad.reason)
                continue
            row = rows.get(case)
            if rows and row is None:
                report.warnings.append(f"{site_dir / 'clinical.csv'}: no row for case {case}; "
                                       "its clinical modality is treated as absent")
            elif row is not None:
                for problem in schema.encode(row)[1]:
                    report.warnings.append(f"{site_dir / 'clinical.csv'}: case {case}: {problem}")
            splits[split].append(preprocess_case(raw, cfg, schema, row, layout.label_spec))
            report.usable[split].append(case)
            if not with_label:
                report.unlabelled.append(case)
    known = set(report.usable["Tr"]) | set(report.usable["Ts"]) | {c for c, _, _ in report.skipped}
    for case in sorted(set(rows) - known):
        report.warnings.append(f"{site_dir / 'clinical.csv'}: row for case {case}, "
                               "which has no image files; ignored")
    if not report.usable["Tr"] and not report.skipped:
        raise SiteDataError(f"{site_dir / 'imagesTr'}: no cases found "
                            f"(expected files named <case>_<cccc>{layout.file_ending})")
    return SiteData(site_dir, layout.label_spec, report, splits["Tr"], splits["Ts"])


def split_train_val(cases: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Deterministic hold-out of a share of the training cases (at least one when there are two)."""
    order = torch.randperm(len(cases), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(len(cases) - 1, max(1, round(fraction * len(cases)))) if len(cases) > 1 else 0
    return [cases[i] for i in order[n_val:]], [cases[i] for i in order[:n_val]]


TENSOR_KEYS = ("image", "presence", "clinical", "stats", "label")


def to_batches(cases: list[dict], batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Stack cases into batch dicts (the format models and training loops take)."""
    batches = []
    for start in range(0, len(cases), batch_size):
        chunk = cases[start:start + batch_size]
        batches.append({k: torch.stack([c[k] for c in chunk]) for k in TENSOR_KEYS if k in chunk[0]})
    return batches
