"""A site's usable cases on the federation's plan: read and validated (common.sitedata), surveyed for the plan,
preprocessed to the canonical grid (common.preprocess), kept in a persistent cache under the site's out-dir, split
and batched."""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mome.common.clinical import ClinicalSchema, missing_columns, parse_schema, read_clinical_csv
from mome.common.config import Config
from mome.common.labels import LabelSpec
from mome.common.preprocess import canonical, case_geometry, voxel_spacing
from mome.common.sitedata import (BadCase, SiteDataError, SiteLayout, SiteReport, discover_cases, foreign_files,
                                  image_file, label_path, read_case, read_layout)
from mome.common.wire import site_id_from_name


@dataclass
class SiteData:
    """A site's usable cases, preprocessed to tensors, plus what was skipped and why."""

    site_dir: Path
    label_spec: LabelSpec
    report: SiteReport
    train: list[dict]
    test: list[dict]  # held-out cases; those with a label file carry "label"
    geometry: list[dict] = field(default_factory=list)  # per usable case (common.preprocess.case_geometry)

    @property
    def site_id(self) -> str:
        return site_id_from_name(self.site_dir.name)

    @property
    def labelled_test(self) -> list[dict]:
        return [c for c in self.test if c["labelled"]]

    @property
    def unlabelled_test(self) -> list[dict]:
        return [c for c in self.test if not c["labelled"]]

    def aggregate_geometry(self) -> dict[str, list[float]]:
        """What a site reports for the plan: medians over its cases of the RAS voxel spacing and the head extent
        (mm), and, per vocabulary channel, the mean over its cases of the head intensity percentiles (0 for a
        channel it lacks; a mean, not a median, so no value is one patient's own)."""
        if not self.geometry:
            return {}
        out = {"spacing": np.median([g["spacing"] for g in self.geometry], axis=0),
               "extent_mm": np.median([g["extent"] for g in self.geometry], axis=0)}
        intensity = np.stack([g["intensity"] for g in self.geometry])  # [cases, channels, percentiles]
        with warnings.catch_warnings():  # a channel the site lacks is all NaN: reported as 0
            warnings.simplefilter("ignore", RuntimeWarning)
            means = np.nan_to_num(np.nanmean(intensity, axis=0))
        for k, name in enumerate(INTENSITY_KEYS):
            out[name] = means[:, k]
        return {k: [round(float(x), 4) for x in v] for k, v in out.items()}


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


INTENSITY_KEYS = ("intensity_p005", "intensity_p50", "intensity_p995")  # common.preprocess.PERCENTILES


def geometry_of(raw: dict) -> dict:
    try:
        return case_geometry(raw["raw_image"], raw["affine"], raw["present"])
    except ValueError as exc:
        raise BadCase(None, str(exc)) from None


def preprocess_case(raw: dict, geometry: dict, cfg: Config, schema: ClinicalSchema, row: dict | None) -> dict:
    """The case on the plan's canonical grid: image, label map (int16), the gate's whole-case summary, and the
    input's geometry (to write predictions back onto it)."""
    planned = np.prod(raw["shape"]) * np.prod(voxel_spacing(raw["affine"])) / np.prod(cfg.spacing)
    if planned * len(cfg.modality_names) > cfg.max_voxels:
        raise BadCase(None, f"at the plan's spacing {cfg.target_spacing} mm it would hold "
                           f"{planned:.0f} voxels per channel, above max-voxels {cfg.max_voxels}")
    try:
        canon = canonical(raw["raw_image"], raw["affine"], raw["present"], cfg.spacing, raw.get("label"))
    except ValueError as exc:
        raise BadCase(None, str(exc)) from None
    clinical, _ = schema.encode(row) if row is not None else ([0.0] * schema.width, [])
    image = canon["image"]
    case = {
        "case_id": raw["case_id"], "affine": raw["affine"], "shape": raw["shape"], "reference": raw["reference"],
        "canonical_affine": canon["affine"], "labelled": "label" in raw, "image": image,
        "summary": F.adaptive_avg_pool3d(image[None], cfg.gate_pool)[0],
        "presence": torch.tensor([*raw["present"], 1.0 if row is not None else 0.0]),
        "clinical": torch.tensor(clinical, dtype=torch.float32),
        "stats": torch.from_numpy(geometry["stats"]),
    }
    if "label" in canon:
        case["label"] = torch.from_numpy(canon["label"])
    return case


CACHE_VERSION = 3  # bump when preprocessing changes what a cached case holds


def _cache_key(layout: SiteLayout, case: str, split: str, with_label: bool, cfg: Config, row: dict | None) -> str:
    """Changes with the case's files (name, size, mtime), the plan's spacing and everything else preprocessing
    reads."""
    folder = layout.site_dir / f"images{split}"
    files = [image_file(folder, case, c, layout.file_ending) for c in layout.channel_modality]
    files += [label_path(layout, case, split)] if with_label else []
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.exists()]
    facts = [CACHE_VERSION, split, stats, cfg.target_spacing, cfg.modalities, cfg.clinical_fields, cfg.gate_pool, row,
             cfg.max_voxels, hashlib.sha256((layout.site_dir / "dataset.json").read_bytes()).hexdigest()]
    return hashlib.sha256(json.dumps(facts, default=str).encode()).hexdigest()[:32]


def _tensors(d: dict, to_torch: bool) -> dict:
    """numpy arrays <-> tensors, so cache files load with torch.load(weights_only=True) (no pickled code)."""
    kind = np.ndarray if to_torch else torch.Tensor
    convert = torch.from_numpy if to_torch else (lambda t: t.numpy())
    numpy_keys = {"affine", "canonical_affine", "spacing", "extent", "intensity"}  # the rest stays torch
    return {k: convert(v) if isinstance(v, kind) and (to_torch or k in numpy_keys) else v for k, v in d.items()}


def _survey_case(layout: SiteLayout, case: str, split: str, with_label: bool, n_modalities: int) -> tuple[dict, dict]:
    """(case, geometry) before there is a plan (the describe step): the case is read and measured, not preprocessed."""
    return {"case_id": case, "labelled": with_label}, geometry_of(read_case(layout, case, split, n_modalities,
                                                                             with_label))


def _load_case(layout: SiteLayout, case: str, split: str, with_label: bool, cfg: Config, schema: ClinicalSchema,
               row: dict | None, cache_dir: Path | None) -> tuple[dict, dict]:
    """(case, geometry), the case preprocessed on the plan's grid; cached in cache_dir, keyed by its files and the
    plan."""
    path = cache_dir / f"{case}-{_cache_key(layout, case, split, with_label, cfg, row)}.pt" if cache_dir else None
    if path is not None and path.exists():
        try:
            saved = torch.load(path, weights_only=True)
            return _tensors(saved["case"], False), _tensors(saved["geometry"], False)
        except Exception:  # a torn or foreign file: preprocess again
            path.unlink(missing_ok=True)
    raw = read_case(layout, case, split, len(cfg.modality_names), with_label)
    geometry = geometry_of(raw)
    item = preprocess_case(raw, geometry, cfg, schema, row)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f"{case}-*.pt"):  # the case under another plan or older files
            stale.unlink(missing_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"case": _tensors(item, True), "geometry": _tensors(geometry, True)}, tmp)
        tmp.replace(path)
    return item, geometry


def load_site(site_dir: Path | str, cfg: Config, cache_dir: Path | None = None, progress: bool = False) -> SiteData:
    """Validate and load every case; bad cases are skipped and reported. Nothing is written but the
    preprocessed-case cache, when a cache_dir is given.

    A held-out case is labelled when labelsTs/ holds its label file; a hospital's held-out cases usually have none,
    and a site may have some of each."""
    site_dir = Path(site_dir)
    report = SiteReport(site_dir)
    layout = read_layout(site_dir, cfg, report)
    schema = parse_schema(cfg.clinical_fields)
    rows = _read_clinical(site_dir, report)
    report.contract += [f"{site_dir / 'clinical.csv'}: {m}" for m in (missing_columns(schema, rows) if rows else [])]
    report.warnings += foreign_files(layout)
    splits: dict[str, list[dict]] = {"Tr": [], "Ts": []}
    geometries: list[dict] = []
    for split in splits:
        for case in tqdm(discover_cases(layout, split), desc=f"{site_dir.name} images{split}", unit="case",
                         disable=not progress, leave=False):
            with_label = split == "Tr" or label_path(layout, case, split).exists()
            try:
                item, geometry = (_load_case(layout, case, split, with_label, cfg, schema, rows.get(case), cache_dir)
                                  if cfg.planned else _survey_case(layout, case, split, with_label,
                                                                   len(cfg.modality_names)))
            except BadCase as bad:
                report.skip(case, bad.path or layout.site_dir / f"images{split}", bad.reason)
                continue
            row = rows.get(case)
            if rows and row is None:
                report.warnings.append(f"{site_dir / 'clinical.csv'}: no row for case {case}; "
                                       "its clinical modality is treated as absent")
            elif row is not None:
                for problem in schema.encode(row)[1]:
                    report.warnings.append(f"{site_dir / 'clinical.csv'}: case {case}: {problem}")
            splits[split].append(item)
            geometries.append(geometry)
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
    return SiteData(site_dir, layout.label_spec, report, splits["Tr"], splits["Ts"], geometries)


def split_train_val(cases: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Deterministic hold-out of a share of the training cases (at least one when there are two)."""
    order = torch.randperm(len(cases), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(len(cases) - 1, max(1, round(fraction * len(cases)))) if len(cases) > 1 else 0
    return [cases[i] for i in order[n_val:]], [cases[i] for i in order[:n_val]]


CASE_KEYS = ("summary", "presence", "clinical", "stats")  # per-case inputs: every patch of a case carries them
INPUT_KEYS = ("image", *CASE_KEYS)  # what a model reads of a case (never the label)


def to_batches(cases: list[dict], batch_size: int, spec: LabelSpec, divisor: int) -> list[dict[str, torch.Tensor]]:
    """Whole cases stacked into batch dicts (what models, the gate and evaluation take): images zero-padded (the
    head's mean after z-scoring, background in the label) to a common shape divisible by `divisor`."""
    batches = []
    for start in range(0, len(cases), batch_size):
        chunk = cases[start:start + batch_size]
        shape = [divisor * -(-max(c["image"].shape[1 + a] for c in chunk) // divisor) for a in range(3)]
        batch = {k: torch.stack([c[k] for c in chunk]) for k in CASE_KEYS}
        batch["image"] = torch.stack([_pad(c["image"], shape) for c in chunk])
        if all("label" in c for c in chunk):
            batch["label"] = torch.stack([torch.from_numpy(spec.to_target(_pad(c["label"][None], shape)[0].numpy()))
                                          for c in chunk])
        batches.append(batch)
    return batches


def _pad(x: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """Zero-pad the trailing three axes at their end to `shape`."""
    pads = [p for a in (2, 1, 0) for p in (0, shape[a] - x.shape[1 + a])]
    return F.pad(x, pads)
