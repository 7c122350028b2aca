"""Deterministic generator of synthetic multi-site brain-tumour MRI federations in nnU-Net v2 raw layout."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from itertools import repeat
from pathlib import Path

import numpy as np
from scipy import ndimage

from mome.common.sitedata import DEFAULT_FILE_ENDING, image_file, site_id
from mome.sim.scanner import ORIENTATIONS, save_scan, scanner_grid, scanner_profile

PRESETS: tuple[str, ...] = ("iid", "scanner-shift", "convention-shift", "few-shot", "missing-modality", "mixed")
SEQUENCES: tuple[str, ...] = ("T1", "T1ce", "T2", "FLAIR")
CONVENTIONS: tuple[str, ...] = ("standard", "margin", "oedema-in-core", "risk-margin")

# Tissue codes of the internal anatomy map (labels use 0-3, the images see all of these).
BG, SCALP, SKULL, CSF, GM, WM, OEDEMA, CORE, ENH = range(9)
# Mean intensity per tissue code, one row per entry of SEQUENCES, before any scanner effect.
_CONTRAST = (
    (0.0, 0.90, 0.08, 0.15, 0.50, 0.75, 0.45, 0.22, 0.50),  # T1: WM bright, CSF dark, core dark
    (0.0, 0.90, 0.08, 0.15, 0.50, 0.75, 0.47, 0.22, 1.20),  # T1ce: enhancing rim very bright
    (0.0, 0.55, 0.05, 1.00, 0.62, 0.40, 0.85, 0.90, 0.65),  # T2: CSF and oedema bright
    (0.0, 0.60, 0.05, 0.08, 0.58, 0.42, 0.95, 0.55, 0.72),  # FLAIR: CSF suppressed, oedema bright
)
_SUBDIRS = ("imagesTr", "labelsTr", "imagesTs", "labelsTs")
# RNG streams of one case; each is independent so e.g. dropping FLAIR does not change T1.
_ANATOMY, _CLINICAL, _MISSING, _BIAS, _CHANNEL = 0, 1, 2, 3, 10


@dataclass(frozen=True)
class SiteSpec:
    """Every heterogeneity knob of one synthetic site; all of them are copied into dataset.json."""

    index: int  # position in the federation; keys every RNG stream of the site (anatomy differs per site)
    site_id: str  # folder name and case-id prefix, e.g. "site-a"
    n_train: int = 16  # cases written to imagesTr/labelsTr
    n_test: int = 12  # held-out cases written to imagesTs/labelsTs
    channels: tuple[str, ...] = SEQUENCES  # sequences the site acquires (subset of SEQUENCES, same order)
    missing_rate: float = 0.0  # probability a case lacks one of channels[1:]; the first is never missing
    convention: str = "standard"  # contouring convention, one of CONVENTIONS
    margin: int = 0  # core margin in voxels for "margin" / "risk-margin" (ball structuring element)
    risk_rate: float = 0.5  # probability that a case's clinical risk is "high"
    scanner: int = 0  # index of the scanner profile the knobs below came from (provenance only)
    spacing: float = 1.0  # isotropic voxel size in mm; heads keep their physical size, so fill fewer voxels
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)  # shift (mm) of the centred affine origin
    gain: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)  # intensity gain per SEQUENCES entry
    offset: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # additive offset inside the head
    bias: float = 0.1  # log-amplitude of the smooth multiplicative bias field (0 = none)
    noise: float = 0.02  # noise standard deviation relative to the channel gain
    rician: bool = True  # Rician (magnitude) noise if True, else (rectified) Gaussian noise
    gamma: float = 1.0  # contrast gamma applied to the noise-free tissue intensities
    psf: float = 0.6  # scanner blur (Gaussian sigma, voxels): partial volume at tissue borders, soft kernels
    orientation: str = "RAS"  # array axis codes the files are stored in (sim.scanner_geometry.ORIENTATIONS)
    slice_factor: int = 1  # slices this many times thicker along the superior axis (anisotropic spacing)

    def __post_init__(self) -> None:
        for name in ("channels", "origin", "gain", "offset"):  # lists from JSON/CLI -> hashable tuples
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.convention not in CONVENTIONS:
            raise ValueError(f"convention {self.convention!r} is not one of {', '.join(CONVENTIONS)}")
        if not self.channels or list(self.channels) != [s for s in SEQUENCES if s in self.channels]:
            raise ValueError(f"channels {self.channels!r} must be a non-empty ordered subset of {SEQUENCES}")
        if self.convention in ("margin", "risk-margin") and self.margin < 1:
            raise ValueError(f"convention {self.convention!r} needs margin >= 1")
        if self.n_train < 1 or self.n_test < 0:
            raise ValueError("n_train must be >= 1 and n_test >= 0")
        if self.orientation not in ORIENTATIONS or self.slice_factor < 1:
            raise ValueError(f"orientation: one of {', '.join(ORIENTATIONS)}; slice_factor >= 1")


@dataclass(frozen=True)
class Anatomy:
    """One drawn head: everything that does not depend on the site's scanner or convention."""

    tissue: np.ndarray  # uint8 tissue codes (BG..ENH)
    label: np.ndarray  # uint8 standard label map: 1 oedema, 2 non-enhancing/necrotic core, 3 enhancing
    head: np.ndarray  # bool, everything inside the scalp
    brain: np.ndarray  # bool, intracranial space (margins are clipped to it)
    texture: np.ndarray  # float32 zero-mean tissue texture
    radius: float  # normalised tumour radius (clinical age correlates with it)


def preset_sites(preset: str, n_sites: int, cases: int | None = None,
                 test_cases: int | None = None) -> list[SiteSpec]:
    """The SiteSpecs of a named preset (see PRESETS); `cases` overrides n_train of non-few-shot sites."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    if n_sites < 1:
        raise ValueError("n_sites must be >= 1")
    n_train = 16 if cases is None else cases
    n_test = 12 if test_cases is None else test_cases
    specs = []
    for i in range(n_sites):
        knobs = {"index": i, "site_id": site_id(i), "n_train": n_train, "n_test": n_test}
        knobs |= scanner_profile(0 if preset in ("iid", "convention-shift") else i)
        knobs |= _preset_knobs(preset, i, n_sites, min(5, n_train))
        specs.append(SiteSpec(**knobs))
    return specs


def _preset_knobs(preset: str, i: int, n: int, few: int) -> dict:
    """Convention / availability / size knobs that a preset sets on site i of n."""
    last = n >= 2 and i == n - 1
    if preset == "convention-shift":
        n_std = 2 if n >= 3 else 1  # with two sites, the second one is shifted, else nothing differs
        if i < n_std:
            return {}
        conv = ("margin", "oedema-in-core", "risk-margin")[(i - n_std) % 3]
        return {"convention": conv, "margin": 0 if conv == "oedema-in-core" else 3}
    if preset == "few-shot":
        return {"n_train": few} if last else {}
    if preset == "missing-modality":
        return {"channels": SEQUENCES[:3]} if i == 1 else {"missing_rate": 0.2}
    if preset == "mixed":
        n_std = math.ceil(n / 2)
        knobs: dict = {"n_train": few} if last else {}
        if i == 1 and n >= 3:
            knobs["channels"] = SEQUENCES[:3]
        if i >= n_std:
            conv = ("risk-margin", "margin", "oedema-in-core")[(i - n_std) % 3]
            knobs |= {"convention": conv, "margin": {"risk-margin": 3, "margin": 2}.get(conv, 0)}
        if i == n_std:
            knobs["missing_rate"] = 0.15
        knobs |= {"orientation": "LPS"} if i == 1 else {}  # scanner geometry: one site stores LPS, one thick slices
        return knobs | ({"slice_factor": 3} if n >= 2 and i == min(2, n - 1) else {})
    return {}  # iid, scanner-shift: the scanner profile is all


def _rng(seed: int, site: int, case: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, site, case, stream])


def _field(rng: np.random.Generator, size: int, k: int) -> np.ndarray:
    """Smooth zero-mean unit-std random field with about k bumps per axis."""
    coarse = rng.standard_normal((k, k, k)).astype(np.float32)
    # Separable Gaussian-bump synthesis: three small matrix products, ~10x cheaper than zoom + blur.
    pos = (np.arange(size) + 0.5) * k / size - 0.5
    basis = np.exp(-0.5 * ((pos[:, None] - np.arange(k)[None, :]) / 0.6) ** 2).astype(np.float32)
    basis /= np.linalg.norm(basis, axis=1, keepdims=True)  # equal variance everywhere, edges included
    f = np.einsum("ai,bj,ck,ijk->abc", basis, basis, basis, coarse, optimize=True)
    return (f - f.mean()) / (f.std() + 1e-6)


def make_case(rng: np.random.Generator, size: int, spacing: float = 1.0) -> Anatomy:
    """Draw a head with a tumour; the result depends only on rng, size and spacing."""
    ax = ((np.arange(size) - (size - 1) / 2) / (size / 2) * spacing).astype(np.float32)
    grid = (ax[:, None, None], ax[None, :, None], ax[None, None, :])
    radii = np.array([0.74, 0.86, 0.76]) * rng.uniform(0.93, 1.03, 3)
    centre = rng.uniform(-0.03, 0.03, 3)
    u, v, w = ((g - c) / r for g, c, r in zip(grid, centre, radii))  # head-normalised coordinates
    r = np.sqrt(u * u + v * v + w * w) + 0.025 * _field(rng, size, 4)
    head, brain = r < 1.0, r < 0.86
    rb = r / 0.86
    fold, sulcus, vent = _field(rng, size, 12), _field(rng, size, 8), _field(rng, size, 5)
    vsize = rng.uniform(0.7, 1.3)
    ventricles = np.zeros(head.shape, bool)
    for side in (-1, 1):
        q = ((u - side * 0.1) / 0.07) ** 2 + ((v - 0.03 * side) / 0.34) ** 2 + ((w - 0.12) / 0.15) ** 2
        ventricles |= q < vsize * (1 + 0.3 * vent)
    sulci = (rb > 0.78) & (np.abs(sulcus) < 0.2)  # zero-crossings of a smooth field look like sulcal lines
    fissure = (np.abs(u) < 0.03) & (rb > 0.5) & (np.abs(v) > 0.35)  # interhemispheric fissure
    tissue = np.zeros(head.shape, np.uint8)
    tissue[head] = SCALP
    tissue[r < 0.93] = SKULL
    tissue[brain] = GM
    wm_edge = 0.76 + 0.08 * fold - 0.22 * (np.abs(sulcus) < 0.45)  # grey matter dips in along sulci
    tissue[brain & (rb < wm_edge)] = WM
    tissue[brain & ((rb > 0.94) | sulci | fissure | ventricles)] = CSF

    # Tumour: a lobulated blob with nested oedema > core > (enhancing rim, necrosis).
    r_min = 1.5 * spacing / (0.65 * size / 2)  # keep the core at least ~1.5 voxels in radius
    radius = float(rng.uniform(max(0.15, r_min), max(0.30, r_min + 0.05)))
    direction = rng.standard_normal(3)
    pos = direction / np.linalg.norm(direction) * max(0.55 - radius / 2, 0.1) * rng.uniform() ** (1 / 3)
    stretch = rng.uniform(0.75, 1.3, 3)
    t_centre = centre + pos * radii
    d = np.sqrt(sum(((g - c) / (radius * s)) ** 2 for g, c, s in zip(grid, t_centre, stretch)))
    d = d + 0.2 * _field(rng, size, 6)
    rim, spread = _field(rng, size, 5), _field(rng, size, 5)
    nec_frac, enh_thr, oed_ext = rng.uniform(0, 0.75), rng.uniform(-2.0, 0.3), rng.uniform(0.8, 1.2)
    inside = brain & (rb < 0.95)
    core = inside & (d < 0.65)
    seed_vox = tuple(np.clip(np.round(t_centre / spacing * size / 2 + (size - 1) / 2).astype(int), 0, size - 1))
    core[seed_vox] = True  # a tumour always has a core, however small the draw
    enh = core & (d >= 0.65 * nec_frac) & (rim > enh_thr)
    oedema = inside & ((d + 0.35 * spread) < oed_ext) | core
    label = np.zeros(head.shape, np.uint8)
    label[oedema], label[core], label[enh] = 1, 2, 3
    tissue[oedema], tissue[core], tissue[enh] = OEDEMA, CORE, ENH
    texture = ndimage.gaussian_filter(rng.standard_normal(head.shape).astype(np.float32), 1.0)
    texture /= texture.std() + 1e-6
    return Anatomy(tissue, label, head, brain, texture, radius)


def apply_convention(label: np.ndarray, brain: np.ndarray, convention: str, margin: int, risk: str) -> np.ndarray:
    """Turn a standard label map into the site's contouring convention."""
    out = label.copy()
    if convention == "oedema-in-core":
        out[out == 1] = 2
    elif convention == "margin" or (convention == "risk-margin" and risk == "high"):
        core = out >= 2
        grown = (ndimage.distance_transform_edt(~core) <= margin) & brain  # CTV-like margin, kept intracranial
        out[grown & ~core] = 2
    return out


def render(anat: Anatomy, sequence: str, spec: SiteSpec, bias_field: np.ndarray,
           rng: np.random.Generator) -> np.ndarray:
    """One MRI channel of a drawn head as seen by the site's scanner (float32, 0 outside the head)."""
    c = SEQUENCES.index(sequence)
    img = np.asarray(_CONTRAST[c], np.float32)[anat.tissue]
    img = ndimage.gaussian_filter(img, spec.psf)
    img = np.clip(img * (1 + 0.04 * anat.texture), 0, None) ** spec.gamma
    img = spec.gain[c] * img * bias_field + spec.offset[c]
    sigma = spec.noise * spec.gain[c]
    img = img + sigma * rng.standard_normal(img.shape, dtype=np.float32)
    if spec.rician:
        img = np.sqrt(img * img + (sigma * rng.standard_normal(img.shape, dtype=np.float32)) ** 2)
    else:
        img = np.abs(img)  # magnitude images are never negative
    img[~anat.head] = 0
    return img.astype(np.float32)


def _affine(spec: SiteSpec, size: int) -> np.ndarray:
    affine = np.diag([spec.spacing] * 3 + [1.0])
    affine[:3, 3] = -(size - 1) / 2 * spec.spacing + np.asarray(spec.origin)
    return affine


def _save(array: np.ndarray, affine: np.ndarray, path: Path, spec: SiteSpec, label: bool = False) -> None:
    save_scan(*scanner_grid(array, affine, spec.orientation, spec.slice_factor, label), path)


def _draw_clinical(rng: np.random.Generator, spec: SiteSpec, radius: float) -> dict[str, str]:
    risk = "high" if rng.random() < spec.risk_rate else "low"
    sex = "F" if rng.random() < 0.5 else "M"
    age = int(np.clip(round(rng.normal(45 + 60 * radius, 12)), 18, 90))  # weakly tied to tumour size
    return {"age": str(age), "sex": sex, "risk": risk}


def _draw_missing(rng: np.random.Generator, spec: SiteSpec) -> list[str]:
    hit, pick = rng.random(), int(rng.integers(1 << 30))
    if len(spec.channels) < 2 or hit >= spec.missing_rate:
        return []
    return [spec.channels[1 + pick % (len(spec.channels) - 1)]]


def _write_case(spec: SiteSpec, site: Path, split: str, case_id: str, case: int, size: int, seed: int,
                affine: np.ndarray) -> tuple[dict[str, str], list[str]]:
    """Write one case's channels and label; return its clinical row and missing sequences."""
    anat = make_case(_rng(seed, spec.index, case, _ANATOMY), size, spec.spacing)
    clinical = _draw_clinical(_rng(seed, spec.index, case, _CLINICAL), spec, anat.radius)
    missing = _draw_missing(_rng(seed, spec.index, case, _MISSING), spec)
    bias = np.exp(spec.bias * _field(_rng(seed, spec.index, case, _BIAS), size, 3)).astype(np.float32)
    for k, seq in enumerate(spec.channels):
        if seq not in missing:
            img = render(anat, seq, spec, bias, _rng(seed, spec.index, case, _CHANNEL + SEQUENCES.index(seq)))
            _save(img, affine, image_file(site / f"images{split}", case_id, k, DEFAULT_FILE_ENDING), spec)
    label = apply_convention(anat.label, anat.brain, spec.convention, spec.margin, clinical["risk"])
    _save(label, affine, site / f"labels{split}" / f"{case_id}.nii.gz", spec, label=True)
    return {"case_id": case_id, **clinical}, missing


def generate_site(spec: SiteSpec, out_dir: Path, size: int, seed: int) -> Path:
    """Write the site folder `out_dir/<spec.site_id>` (replacing its image/label folders); return its path."""
    site = Path(out_dir) / spec.site_id
    if size < 16:
        raise ValueError("size must be >= 16")
    for sub in _SUBDIRS:
        shutil.rmtree(site / sub, ignore_errors=True)  # stale cases from a bigger earlier run would be read
        (site / sub).mkdir(parents=True)
    affine = _affine(spec, size)
    rows, missing = [], {}
    for case in range(spec.n_train + spec.n_test):
        case_id = f"{spec.site_id}_{case:03d}"
        split = "Tr" if case < spec.n_train else "Ts"
        row, lacks = _write_case(spec, site, split, case_id, case, size, seed, affine)
        rows.append(row)
        missing |= {case_id: lacks} if lacks else {}
    with (site / "clinical.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["case_id", "age", "sex", "risk"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    meta = {
        "name": spec.site_id,
        "description": f"Synthetic brain-tumour MRI site: scanner {spec.scanner}, {spec.convention} contouring",
        "channel_names": {str(k): seq for k, seq in enumerate(spec.channels)},
        "labels": {"background": 0, "whole_tumor": [1, 2, 3], "tumor_core": [2, 3], "enhancing_tumor": 3},
        "regions_class_order": [1, 2, 3], "numTraining": spec.n_train, "numTest": spec.n_test,
        "file_ending": ".nii.gz", "missing_channels": missing,
        "synthetic": {**asdict(spec), "seed": seed, "size": size},
    }
    (site / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    return site


def generate_federation(out: Path, sites: int = 4, preset: str = "mixed", seed: int = 0, size: int = 48,
                        cases: int | None = None, test_cases: int | None = None) -> list[Path]:
    """Write every site of a preset under `out`; return the site folders in order."""
    specs = preset_sites(preset, sites, cases, test_cases)
    Path(out).mkdir(parents=True, exist_ok=True)
    # sites are independent; forked workers (a forkserver's would first import torch and MONAI, ~7 s each)
    with ProcessPoolExecutor(max_workers=max(1, min(len(specs), len(os.sched_getaffinity(0))))) as pool:
        return list(pool.map(generate_site, specs, repeat(Path(out)), repeat(size), repeat(seed)))


def site_traits(site: Path) -> str | None:
    """How a generated site is made ("risk-margin 3 vox, 16 training cases, no FLAIR"); None for
    sites that are not synthetic. Reports use it to show where MoME should help."""
    meta = json.loads((Path(site) / "dataset.json").read_text()).get("synthetic")
    if not meta:
        return None
    traits = [meta["convention"] + (f" {meta['margin']} vox" if meta["margin"] else ""),
              f"{meta['n_train']} training cases", *([o] if (o := meta.get("orientation", "RAS")) != "RAS" else []),
              *([f"{meta['slice_factor']}x thicker slices"] if meta.get("slice_factor", 1) > 1 else [])]
    if missing := [s for s in SEQUENCES if s not in meta["channels"]]:
        traits.append("no " + "/".join(missing))
    if meta["missing_rate"]:
        traits.append(f"{meta['missing_rate']:.0%} cases lack a sequence")
    return ", ".join(traits)
