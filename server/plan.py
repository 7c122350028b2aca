"""nnU-Net's fingerprint -> plan, federated: the sites' aggregate geometry in, the federation's target spacing,
training patch and sliding-window overlap out. A pure function: the coordinator never sees a case."""

from __future__ import annotations

from typing import Mapping, Sequence

import logging

import numpy as np

from mome.common.config import Config
from mome.common.patches import fit_patch

log = logging.getLogger("mome.plan")
ANISOTROPY = 3.0  # nnU-Net: data whose coarsest axis is this many times the finest is anisotropic
LOWRES_PERCENTILE = 10  # ... and its coarse axis is planned at this percentile of the spacings, not the median
GEOMETRY_KEYS = ("spacing", "extent_mm")  # what describe replies carry for the plan (RAS order, 3 values each)


SANE = {"spacing": (0.3, 8.0), "extent_mm": (10.0, 500.0)}  # outside these a site's geometry is not believed


def site_geometry(metrics: Mapping) -> dict | None:
    """The plan's inputs from a describe reply, or None when absent or not believable (one site cannot bend the
    plan with NaN or absurd values; the median over sites bounds what a believable liar can do)."""
    try:
        out = {k: [float(v) for v in metrics[k]] for k in GEOMETRY_KEYS}
    except (KeyError, TypeError, ValueError):
        return None
    ok = all(len(v) == 3 and all(SANE[k][0] <= x <= SANE[k][1] for x in v) for k, v in out.items())
    return out if ok else None


def target_spacing(spacings: np.ndarray) -> np.ndarray:
    """Median per axis; for anisotropic data the coarse axis takes a low percentile instead, so that thin-slice
    sites are not thrown down to the coarsest site's resolution (nnU-Net's rule)."""
    target = np.median(spacings, axis=0)
    coarse = int(np.argmax(target))
    finest = np.min(np.delete(target, coarse))
    if target[coarse] > ANISOTROPY * finest:
        target[coarse] = max(np.percentile(spacings[:, coarse], LOWRES_PERCENTILE), finest)
    return target


def make_plan(geometries: Sequence[Mapping[str, Sequence[float]]], cfg: Config) -> dict:
    """Plan from the sites' geometry ({"spacing": [x, y, z] mm, "extent_mm": [x, y, z]} medians per site).
    Values already set in cfg (target-spacing, patch-size) are kept; with no geometry at all, 1 mm."""
    spacings = np.array([g["spacing"] for g in geometries], dtype=np.float64).reshape(-1, 3)
    extents = np.array([g["extent_mm"] for g in geometries], dtype=np.float64).reshape(-1, 3)
    if cfg.target_spacing:
        spacing = np.array(cfg.spacing)
    elif len(spacings):
        spacing = target_spacing(spacings)
    else:
        log.warning("no site reported believable geometry: planning at 1 mm")
        spacing = np.ones(3)
    if cfg.patch_size:
        patch = cfg.patch
    else:
        shape = np.median(extents, axis=0) / spacing if len(extents) else np.full(3, 64.0)
        patch = fit_patch(shape, cfg.max_patch_voxels, cfg.divisor)
    return {"target_spacing": [round(float(s), 4) for s in spacing], "patch_size": list(patch),
            "sw_overlap": cfg.sw_overlap, "sites": len(geometries)}


def planned_config(cfg: Config, plan: dict) -> Config:
    return cfg.replace(target_spacing=",".join(f"{s:g}" for s in plan["target_spacing"]),
                       patch_size=",".join(str(p) for p in plan["patch_size"]), sw_overlap=plan["sw_overlap"])
