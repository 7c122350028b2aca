"""A synthetic site's scanner: its intensity profile (spacing, gain, bias, noise, ...), and how it stores a volume
drawn in RAS: thick slices (anisotropic spacing), the array axis order and directions a DICOM converter might
write (LPS, permuted axes), with the affine to match."""

from __future__ import annotations

import nibabel as nib
import numpy as np

# Scanner profiles: spacing, origin shift, gain, offset (per sequence), bias, noise, rician, gamma, and the point
# spread (Gaussian sigma in voxels): scanners and reconstruction kernels differ in sharpness as much as in contrast.
_SCANNERS = (
    (1.0, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0, 1.0), (0.0, 0.0, 0.0, 0.0), 0.10, 0.02, True, 1.0, 0.6),
    (1.2, (3.0, -5.0, 8.0), (1.6, 1.3, 0.8, 1.4), (0.10, 0.05, 0.0, 0.15), 0.35, 0.05, False, 0.75, 1.0),
    (1.1, (-4.0, 2.0, -6.0), (0.7, 0.9, 1.3, 0.8), (0.0, 0.10, 0.05, 0.0), 0.20, 0.08, True, 1.35, 0.8),
    (0.95, (1.5, 4.0, 0.0), (1.2, 1.5, 1.1, 0.9), (0.05, 0.0, 0.10, 0.05), 0.45, 0.035, True, 1.15, 0.45),
)
ORIENTATIONS = ("RAS", "LPS", "LAS", "PIR", "ASL", "SPL")  # a few of the 48 axis codes, permuted ones included


def save_scan(array: np.ndarray, affine: np.ndarray, path) -> None:
    """A NIfTI as a scanner's converter writes it: the affine as both qform and sform (code 1, scanner), mm units.
    nibabel gzips with mtime 0, so the file is byte-reproducible."""
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, path)


def thick_slices(array: np.ndarray, affine: np.ndarray, factor: int, label: bool) -> tuple[np.ndarray, np.ndarray]:
    """Slices `factor` times thicker along the last (superior) axis: images average each group of slices (a thick
    slice's partial volume), labels take the group's middle slice; the affine keeps the same physical extent."""
    if factor <= 1:
        return array, affine
    n = array.shape[2] // factor
    groups = array[:, :, : n * factor].reshape(*array.shape[:2], n, factor)
    out = groups[..., factor // 2] if label else groups.mean(axis=-1, dtype=np.float32)
    thick = affine.copy()
    thick[:3, 2] *= factor
    thick[:3, 3] += affine[:3, 2] * (factor - 1) / 2  # voxel centres move to the middle of each group
    return np.ascontiguousarray(out.astype(array.dtype)), thick


def reorient(array: np.ndarray, affine: np.ndarray, axcodes: str) -> tuple[np.ndarray, np.ndarray]:
    """The same volume stored with array axes along `axcodes` (e.g. "LPS"), its affine adjusted so every voxel keeps
    its place in space."""
    if axcodes not in ORIENTATIONS:
        raise ValueError(f"orientation {axcodes!r}: choose from {', '.join(ORIENTATIONS)}")
    current = nib.orientations.io_orientation(affine)
    transform = nib.orientations.ornt_transform(current, nib.orientations.axcodes2ornt(tuple(axcodes)))
    out = nib.orientations.apply_orientation(array, transform)
    return np.ascontiguousarray(out), affine @ nib.orientations.inv_ornt_aff(transform, array.shape)


def scanner_grid(array: np.ndarray, affine: np.ndarray, orientation: str, slice_factor: int,
                 label: bool = False) -> tuple[np.ndarray, np.ndarray]:
    array, affine = thick_slices(array, affine, slice_factor, label)
    return reorient(array, affine, orientation)


def scanner_profile(k: int) -> dict:
    """SiteSpec knobs of scanner k: four hand-made profiles, then reproducible random ones."""
    if k < len(_SCANNERS):
        values = _SCANNERS[k]
    else:
        r = np.random.default_rng([k, 7919])  # fixed per k: presets take no seed

        def draw(lo: float, hi: float, n: int = 0, digits: int = 2):
            return round(float(r.uniform(lo, hi)), digits) if not n else tuple(
                np.round(r.uniform(lo, hi, n), digits).tolist())

        values = (float(r.choice([0.95, 1.0, 1.1, 1.2])), draw(-8, 8, 3, 1), draw(0.6, 1.7, 4), draw(0, 0.15, 4),
                  draw(0.05, 0.45), draw(0.02, 0.08, 0, 3), bool(r.random() < 0.5), draw(0.75, 1.35),
                  draw(0.45, 1.1))
    names = ("spacing", "origin", "gain", "offset", "bias", "noise", "rician", "gamma", "psf")
    return {"scanner": k, **dict(zip(names, values))}
