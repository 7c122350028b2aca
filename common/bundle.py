"""The model a site ends up using, saved as a folder: weights.npz + metadata.json (MONAI-bundle style)."""

from __future__ import annotations

import io
import json
import os
import platform
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import metadata as pkg_metadata
from pathlib import Path

import numpy as np

from mome.common.atomic import atomic_write_bytes
from mome.common.config import Config, config_from_mapping
from mome.common.labels import LabelSpec
from mome.common.state import flatten_states, unflatten_states

FORMAT = "mome-bundle/2"  # /2: weights keyed experts/<name>/<param> and gate/<param> (common.state.flatten_states)
# weights.npz unpacked: far above any model here (a few MB), far below what would exhaust a site's memory
MAX_WEIGHTS_BYTES = 4 * 2**30
MAX_COMPRESSION_RATIO = 1000  # np.savez stores members uncompressed; deflate itself tops out near 1030x


@dataclass
class Bundle:
    """Experts (one for a single shared model) and an optional gate, with what predict needs to know."""

    cfg: Config
    label_spec: LabelSpec
    experts: dict[str, dict[str, np.ndarray]]  # name (site id, or "shared") -> state
    gate: dict[str, np.ndarray] | None = None
    strategy: str = "mome"
    site_id: str = ""

    def metadata(self) -> dict:
        return {
            "format": FORMAT, "strategy": self.strategy, "site_id": self.site_id,
            "experts": list(self.experts), "has_gate": self.gate is not None,
            "modalities": list(self.cfg.modality_names), "clinical_fields": self.cfg.clinical_fields,
            "labels": self.label_spec.to_dict(),
            "plan": {"orientation": "RAS", "target_spacing_mm": self.cfg.target_spacing,
                     "patch_size": self.cfg.patch_size, "sw_overlap": self.cfg.sw_overlap,
                     "crop": "head mask (threshold, largest component, holes filled)",
                     "normalise": "z-score per channel over the head, 0 outside"},
            "config": self.cfg.to_dict(), "versions": _versions(),
        }


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("mome-fl", "torch", "monai", "flwr", "nibabel", "numpy"):
        try:
            out[name] = pkg_metadata.version(name)
        except pkg_metadata.PackageNotFoundError:
            pass
    return out


def save_bundle(bundle: Bundle, folder: Path) -> Path:
    """Write into a temporary sibling folder, then swap it in, so a reader never sees half a bundle. Leftovers of
    a save that crashed (a half-written temporary folder, a `.old` one) are cleared first; a `.old` that is the
    only complete copy (the crash fell between the two renames) is kept until the new bundle is in place."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    old = folder.with_name(f".{folder.name}.old")
    for stale in folder.parent.glob(f".{folder.name}.*"):
        if stale != old or folder.exists():
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp"))
    buffer = io.BytesIO()
    np.savez(buffer, **flatten_states({"experts": bundle.experts, "gate": bundle.gate or {}}))
    # flushed to disk before the folder is swapped in: a power cut must not leave empty files
    atomic_write_bytes(tmp / "weights.npz", buffer.getvalue(), 0o644)
    atomic_write_bytes(tmp / "metadata.json", json.dumps(bundle.metadata(), indent=2).encode(), 0o644)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def check_weights_size(path: Path, limit: int = MAX_WEIGHTS_BYTES) -> None:
    """Refuse a weights.npz that would unpack past `limit` bytes, or holds a member packed absurdly tightly (a zip
    bomb), from the zip's directory alone; zipfile then inflates no member past the size it declared."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except zipfile.BadZipFile as exc:
        raise ValueError(f"{path}: not a weights archive ({exc})") from exc
    total = sum(m.file_size for m in members)
    if total > limit:
        raise ValueError(f"{path}: members declare {total} bytes uncompressed, above the limit of {limit} bytes")
    for m in members:
        if m.file_size > MAX_COMPRESSION_RATIO * max(m.compress_size, 1):
            raise ValueError(f"{path}: member {m.filename} declares {m.file_size} bytes from {m.compress_size} "
                             f"compressed, a ratio above {MAX_COMPRESSION_RATIO}x")


def load_bundle(folder: Path, max_weights_bytes: int = MAX_WEIGHTS_BYTES) -> Bundle:
    """A bundle folder; if a save crashed between its two renames, the complete previous copy beside it."""
    folder = Path(folder)
    if not folder.exists() and (fallback := folder.with_name(f".{folder.name}.old")).is_dir():
        folder = fallback
    meta_path = folder / "metadata.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: missing; is {folder} a model bundle?")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") not in (FORMAT, "mome-bundle/1"):
        raise ValueError(f"{meta_path}: bundle format {meta.get('format')!r}, this version reads {FORMAT!r}")
    check_weights_size(folder / "weights.npz", max_weights_bytes)  # before np.load allocates anything
    with np.load(folder / "weights.npz", allow_pickle=False) as npz:
        # /1 keyed experts as expert/<name>/<param>
        weights = unflatten_states({key.replace("expert/", "experts/", 1) if key.startswith("expert/") else key:
                                    npz[key] for key in npz.files})
    experts = {name: weights["experts"][name] for name in meta["experts"]}
    gate = weights.get("gate", {}) if meta["has_gate"] else None
    bundle = Bundle(config_from_mapping(meta["config"]), LabelSpec.from_dict(meta["labels"]), experts,
                    gate, meta["strategy"], meta.get("site_id", ""))
    check_shapes(bundle, folder)
    return bundle


def check_shapes(bundle: Bundle, folder: Path) -> None:
    """The weights must be exactly those of the networks the config describes. Checked on networks built on torch's
    meta device (shapes only, nothing allocated): a config that declares a huge network costs nothing here."""
    import torch

    from mome.common.gate import ANCHOR, load_gate
    from mome.common.model import load_expert

    with torch.device("meta"):
        wanted = {"expert": load_expert(bundle.cfg, bundle.label_spec.n_out).state_dict()}
        if bundle.gate is not None:
            wanted["gate"] = load_gate(bundle.cfg, len(bundle.experts)).state_dict()
            if ANCHOR in bundle.gate:  # a site's kept gate (GateNet.anchored)
                wanted["gate"][ANCHOR] = torch.zeros(len(bundle.experts))
    states = [("expert", name, state) for name, state in bundle.experts.items()]
    states += [("gate", "gate", bundle.gate)] if bundle.gate is not None else []
    for kind, name, state in states:
        got = {k: tuple(v.shape) for k, v in state.items()}
        want = {k: tuple(v.shape) for k, v in wanted[kind].items()}
        if got != want:
            diff = sorted(set(got.items()) ^ set(want.items()))[:2]
            raise ValueError(f"{folder}: the weights of {name} do not match the network its config describes "
                             f"(e.g. {diff})")
