"""Read one site folder (nnU-Net v2 raw layout): validate every case, skip bad ones with a reason."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import nibabel as nib
import numpy as np

from mome.common.config import Config
from mome.common.labels import LabelSpec, label_spec_from_dataset_json
from mome.common.preprocess import affine_problem

DEFAULT_FILE_ENDING = ".nii.gz"  # dataset.json without a file_ending (nnU-Net's default)

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
    contract: list[str] = field(default_factory=list)  # where the site breaks the federation's data contract
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
        lines += [f"  contract: {c}" for c in self.contract]
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
    ending = str(meta.get("file_ending", DEFAULT_FILE_ENDING))
    return SiteLayout(site_dir, spec, mapping, ending, missing, cfg.max_voxels)


def _channel_index(channels: dict[int, str], name: str | int) -> int:
    if isinstance(name, int) or str(name).isdigit():
        return int(name)
    for index, value in channels.items():
        if value == name:
            return index
    raise ValueError(f"missing_channels names unknown channel {name!r}")


def image_file(folder: Path, case: str, channel: int, file_ending: str) -> Path:
    """nnU-Net's image file of one channel of a case: <case>_<cccc><file_ending>."""
    return folder / f"{case}_{channel:04d}{file_ending}"


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


def foreign_files(layout: SiteLayout) -> list[str]:
    """Files in the image and label folders that are not cases of this site's file_ending (another format, a
    misnamed file), each with what is read instead: none of them is used."""
    found = []
    for folder in ("imagesTr", "imagesTs", "labelsTr", "labelsTs"):
        named = channel_file(layout.file_ending) if folder.startswith("images") else None
        for p in sorted((layout.site_dir / folder).iterdir()) if (layout.site_dir / folder).is_dir() else []:
            if p.name.startswith(".") or (named.match(p.name) if named else p.name.endswith(layout.file_ending)):
                continue
            kind = (f"a {p.suffix} file" if p.suffix not in ("", ".nii", ".gz")
                    else "a folder" if p.is_dir() else "not named as a case")
            found.append(f"{folder}/{p.name}: {kind}, not used; a case is "
                         f"{'<case>_<cccc>' if named else '<case>'}{layout.file_ending} (NIfTI, dataset.json's "
                         "file_ending; convert .mha/.nrrd with SimpleITK, DICOM with dcm2niix)")
    return found


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
    if problem := affine_problem(img.affine):
        raise ValueError(problem)
    return data, img.affine


class BadCase(Exception):
    """One case cannot be used: the file at fault (None: the case as a whole) and why."""

    def __init__(self, path: Path | None, reason: str):
        super().__init__(f"{path}: {reason}" if path else reason)
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
        path = image_file(image_dir, case, channel, layout.file_ending)
        if not path.exists():
            if allow_missing or channel in layout.missing.get(case, set()):
                continue
            raise BadCase(path, "missing channel file (not declared in missing_channels)")
        try:
            data, aff = _read_volume(path, layout.max_voxels)
        except ValueError as exc:
            raise BadCase(path, str(exc)) from None
        if shape is None:
            shape, affine, reference = data.shape, aff, path
            image = np.zeros((n_modalities, *shape), dtype=np.float32)
        elif data.shape != shape:
            raise BadCase(path, f"shape {data.shape} differs from the case's other channels {shape}")
        elif not np.allclose(aff, affine, atol=1e-3):
            raise BadCase(path, "affine differs from the case's other channels")
        image[modality], present[modality] = data, 1.0
    if image is None:
        raise BadCase(image_dir, f"case {case} has no usable channel")
    out = {"case_id": case, "raw_image": image, "present": present, "affine": affine, "shape": shape,
           "reference": str(reference)}  # a channel file: predictions are written with its header
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
