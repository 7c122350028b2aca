"""Canonical geometry of a case and its inverse, on MONAI: RAS orientation from the NIfTI affine, the plan's voxel
spacing, cropped to the head (a real foreground mask, zero outside it), z-scored per channel over the head.
Predictions go back to the input's own grid through the affines the transforms recorded."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (Compose, CropForegroundd, MapTransform, NormalizeIntensityd, Orientationd,
                              SpatialResample)
from scipy import ndimage

# a voxel is tissue where some present channel exceeds this share of its 99th percentile: interpolation halos,
# background noise and the dark skull stay below it; the skull and other dark tissue inside the head come back
# when the mask's holes are filled
HEAD_THRESHOLD = 0.1
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # NIfTI world axes (MONAI warns unless they are named)
PERCENTILES = (0.5, 50.0, 99.5)  # per-channel head intensity percentiles a site reports (over its cases' medians)


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size in mm along each stored array axis."""
    return np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)


def affine_problem(affine: np.ndarray) -> str | None:
    """Why an affine cannot place a scan in space (None when it can)."""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        return "affine has NaN/inf entries"
    spacing = voxel_spacing(affine)
    if (spacing <= 1e-6).any():
        return f"voxel spacing {np.round(spacing, 6).tolist()} has a zero axis"
    if abs(np.linalg.det(affine[:3, :3])) <= 1e-9 * np.prod(spacing):
        return "affine is singular (its axes are not independent)"
    return None


def head_mask(image: np.ndarray, present: np.ndarray) -> np.ndarray:
    """The head: voxels above HEAD_THRESHOLD of a present channel's 99th percentile, largest component, holes
    filled. Robust to how a scan was resampled (halo), to background noise and to non-zero backgrounds."""
    tissue = np.zeros(image.shape[1:], dtype=bool)
    for c in np.flatnonzero(present):
        positive = image[c][image[c] > 0]
        if positive.size:
            tissue |= image[c] > HEAD_THRESHOLD * np.percentile(positive, 99)
    labels, n = ndimage.label(tissue)
    if n == 0:
        return tissue
    largest = np.argmax(np.bincount(labels.ravel())[1:]) + 1
    return ndimage.binary_fill_holes(labels == largest)


def field_of_view_grid(affine: np.ndarray, shape, spacing) -> tuple[np.ndarray, tuple[int, ...]]:
    """The grid of `spacing` mm over a scan's field of view (nnU-Net's convention): the shape rounded from the
    extent, centred where the scan is. MONAI's Spacing keeps the first voxel's centre instead, so the same head
    stored on a finer grid of the same extent would land a fraction of a voxel away."""
    affine = np.asarray(affine, dtype=np.float64)
    shape, spacing = np.asarray(shape, dtype=np.float64), np.asarray(spacing, dtype=np.float64)
    old = voxel_spacing(affine)
    new_shape = np.maximum(1, np.round(shape * old / spacing)).astype(int)
    target = affine.copy()
    target[:3, :3] = affine[:3, :3] / old * spacing
    centre = affine[:3, :3] @ ((shape - 1) / 2) + affine[:3, 3]
    target[:3, 3] = centre - target[:3, :3] @ ((new_shape - 1) / 2)
    return target, tuple(int(n) for n in new_shape)


class FieldOfViewSpacingd(MapTransform):
    """Resamples the keys (one interpolation mode each) to `spacing` mm on field_of_view_grid of the first key."""

    def __init__(self, keys, spacing, modes, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.spacing, self.modes = tuple(float(s) for s in spacing), tuple(modes)

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        first = d[self.first_key(d)]
        target, shape = field_of_view_grid(first.affine.numpy(), first.shape[1:], self.spacing)
        for key, mode in self.key_iterator(d, self.modes):
            d[key] = SpatialResample(mode=mode, padding_mode="border")(
                d[key], dst_affine=torch.as_tensor(target), spatial_size=shape)
        return d


class HeadMaskd(MapTransform):
    """Adds data["head"] (the head mask, same grid and meta as the image) and sets the image to 0 outside it."""

    def __init__(self, keys: str = "image", present_key: str = "present", mask_key: str = "head"):
        super().__init__(keys)
        self.present_key, self.mask_key = present_key, mask_key

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        image = d[self.keys[0]]
        mask = head_mask(np.asarray(image), np.asarray(d[self.present_key]))
        if not mask.any():
            raise ValueError("the head is empty (no voxel above the foreground threshold)")
        keep = torch.as_tensor(mask)[None]
        d[self.keys[0]] = image * keep
        d[self.mask_key] = image[:1] * 0 + keep.to(image.dtype)  # keeps the image's MetaTensor affine
        return d


def canonical_transform(spacing: tuple[float, float, float]) -> Compose:
    """Image (and label, nearest) to RAS at `spacing` mm, cropped to the head, z-scored over the head."""
    keys = ("image", "label")
    return Compose([
        Orientationd(keys=keys, axcodes="RAS", allow_missing_keys=True, labels=RAS_LABELS),
        FieldOfViewSpacingd(keys=keys, spacing=spacing, modes=("bilinear", "nearest"), allow_missing_keys=True),
        HeadMaskd(),
        CropForegroundd(keys=(*keys, "head"), source_key="head", allow_missing_keys=True),
        NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
    ])


def canonical(image: np.ndarray, affine: np.ndarray, present: np.ndarray, spacing: tuple[float, float, float],
              label: np.ndarray | None = None) -> dict:
    """{"image": [M, ...] float32, "label"?: [...] (nearest), "affine": the canonical crop's 4x4 affine}."""
    meta_affine = torch.as_tensor(np.asarray(affine, dtype=np.float64))
    data = {"image": MetaTensor(torch.from_numpy(image), affine=meta_affine), "present": present}
    if label is not None:
        data["label"] = MetaTensor(torch.from_numpy(label[None].astype(np.float32)), affine=meta_affine)
    data = canonical_transform(spacing)(data)
    out = {"image": data["image"].as_tensor().float().clone(),  # a copy: the crop's view would keep the whole grid
           "affine": np.asarray(data["image"].affine, dtype=np.float64)}
    if label is not None:
        out["label"] = data["label"].as_tensor()[0].round().to(torch.int16).numpy()
    return out


def to_input_grid(probs: torch.Tensor, canonical_affine: np.ndarray, affine: np.ndarray,
                  shape: tuple[int, ...]) -> np.ndarray:
    """Probabilities [C, ...] on the canonical crop back onto the input's voxel grid (its shape, orientation,
    affine); 0 outside the head."""
    source = MetaTensor(probs.float(), affine=torch.as_tensor(canonical_affine))
    out = SpatialResample(mode="bilinear", padding_mode="zeros")(
        source, dst_affine=torch.as_tensor(np.asarray(affine, dtype=np.float64)), spatial_size=tuple(shape))
    return np.asarray(out.as_tensor(), dtype=np.float32)


def intensity_cues(head: np.ndarray, percentiles: np.ndarray) -> np.ndarray:
    """Two numbers per channel for the gate that tell scanners apart where z-scoring hides it, in no unit: the
    head's spread relative to its median and its bright tail relative to its spread. Raw intensities have no unit
    in MRI (a hospital's export may scale them by 1000), so nothing here changes when they are scaled."""
    low, median, high = percentiles
    spread = high - low
    if not np.isfinite(spread) or spread <= 0 or median <= 0:
        return np.zeros(2, dtype=np.float32)
    return np.array([np.log1p(spread / median), (high - median) / spread], dtype=np.float32)


def case_geometry(image: np.ndarray, affine: np.ndarray, present: np.ndarray) -> dict:
    """One case's geometry in RAS axis order (spacing and head extent in mm), head intensity percentiles per
    channel (NaN where absent; only aggregates over a site's cases leave it) and the gate's intensity cues
    (intensity_cues: scanner-level differences the z-scoring removes, free of the intensities' unit)."""
    axes = nib.orientations.io_orientation(affine)[:, 0].astype(int)
    mask = head_mask(image, present)
    if not mask.any():
        raise ValueError("the head is empty (no voxel above the foreground threshold)")
    spacing = voxel_spacing(affine)
    extent = np.array([np.ptp(np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != k)))) + 1
                       for k in range(3)]) * spacing
    ras_spacing, ras_extent = np.empty(3), np.empty(3)
    ras_spacing[axes], ras_extent[axes] = spacing, extent
    intensity = np.full((image.shape[0], len(PERCENTILES)), np.nan)
    stats = np.zeros((image.shape[0], 2), dtype=np.float32)
    for c in np.flatnonzero(present):
        head = image[c][mask]
        intensity[c] = np.percentile(head, PERCENTILES)
        stats[c] = intensity_cues(head, intensity[c])
    return {"spacing": ras_spacing, "extent": ras_extent, "intensity": intensity, "stats": stats.reshape(-1)}


