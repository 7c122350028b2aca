"""Scan variants a hospital's data has and the synthetic sites lack: the same case resampled (with the faint halo
interpolation leaves), with background noise, blurred (a softer kernel), in another intensity unit, on another grid
(the issue's 4x4x6 mm relative to 5 mm voxels: finer in-plane, coarser across slices; or thicker slices) or a
BraTS-sized one. Orientation and thick slices: sim/scanner.py. Used by
the geometry tests and benchmarks; labels follow with nearest neighbour."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
from nibabel.processing import resample_from_to
from scipy import ndimage

from mome.common.clinical import read_clinical_csv
from mome.sim.scanner import save_scan

Transform = Callable[[np.ndarray, np.ndarray, bool], tuple[np.ndarray, np.ndarray]]  # (array, affine, is_label)


def write_case(folder: Path, site_dir: Path, case: str, transform: Transform) -> Path:
    """A held-out case of site_dir (channel files and label) through transform into folder (imagesTs/, labelsTs/,
    dataset.json, and the case's clinical.csv row): a one-case site predict can read as the site would."""
    for sub in ("imagesTs", "labelsTs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    meta = json.loads((site_dir / "dataset.json").read_text())
    (folder / "dataset.json").write_text(json.dumps({k: meta[k] for k in ("channel_names", "labels",
                                                     "regions_class_order", "file_ending")}))
    if (site_dir / "clinical.csv").exists():
        row = read_clinical_csv(site_dir / "clinical.csv").get(case)
        if row is None:
            raise ValueError(f"{site_dir / 'clinical.csv'} has no row for {case}")
        with (folder / "clinical.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(row))
            writer.writeheader()
            writer.writerow(row)
    for src in sorted((site_dir / "imagesTs").glob(f"{case}_*.nii.gz")) + [site_dir / "labelsTs" / f"{case}.nii.gz"]:
        img = nib.load(src)
        label = src.parent.name == "labelsTs"
        array, affine = transform(np.asarray(img.dataobj), img.affine, label)
        save_scan(array.astype(np.uint8 if label else np.float32), affine, folder / src.parent.name / src.name)
    return folder


def resampled(shape_of) -> Transform:
    """transform(array, affine, label) resampling onto the grid shape_of(array.shape, affine) -> (shape, affine)
    with linear interpolation (labels nearest)."""
    def transform(array, affine, label):
        shape, target = shape_of(array.shape, affine)
        img = nib.Nifti1Image(array.astype(np.float32), affine)
        out = resample_from_to(img, (shape, target), order=0 if label else 1)
        return np.asarray(out.dataobj), out.affine
    return transform


def grid(factors) -> Callable:
    """A grid over the same extent with voxels `factors` times the size (a factor < 1 is finer)."""
    def shape_of(shape, affine):
        new_shape = tuple(max(1, int(round(s / f))) for s, f in zip(shape, factors))
        target = affine.copy()
        target[:3, :3] = affine[:3, :3] * np.asarray(factors)
        target[:3, 3] = affine[:3, 3] + affine[:3, :3] @ ((np.asarray(factors) - 1) / 2)  # same outer edge
        return new_shape, target
    return shape_of


def halo(array, affine, label):
    """Upsampled x4 and back with linear interpolation: a faint halo of tiny values around the head."""
    if label:
        return array, affine
    up, up_affine = resampled(grid((0.25, 0.25, 0.25)))(array, affine, False)
    back = resample_from_to(nib.Nifti1Image(up.astype(np.float32), up_affine), (array.shape, affine), order=1)
    return np.asarray(back.dataobj), affine


def noisy(array, affine, label):
    """Low-level Rician background noise everywhere (2% of the channel's bright end), as a scanner leaves it."""
    if label:
        return array, affine
    rng = np.random.default_rng(int(array.sum()) % 2**32)
    sigma = 0.02 * np.percentile(array[array > 0], 99)
    return np.hypot(array + sigma * rng.standard_normal(array.shape), sigma * rng.standard_normal(array.shape)), affine


def brats_sized(array, affine, label):
    """The same head on a 240x240x155 grid of the same extent (BraTS' array shape, finer voxels)."""
    return resampled(lambda shape, aff: _fit(shape, aff, (240, 240, 155)))(array, affine, label)


def _fit(shape, affine, new_shape):
    factors = np.asarray(shape, dtype=float) / np.asarray(new_shape)
    target = affine.copy()
    target[:3, :3] = affine[:3, :3] * factors
    target[:3, 3] = affine[:3, 3] + affine[:3, :3] @ ((factors - 1) / 2)
    return tuple(new_shape), target


def blurred(array, affine, label):
    """A softer reconstruction kernel: Gaussian blur of 0.7 voxels, about what two linear resamplings leave."""
    return (array, affine) if label else (ndimage.gaussian_filter(array.astype(np.float32), 0.7), affine)


def rescaled(array, affine, label):
    """Another export of the same scan: intensities x1000 (MRI intensities have no unit)."""
    return (array, affine) if label else (array.astype(np.float32) * 1000.0, affine)


VARIANTS: dict[str, Transform] = {
    "original": lambda a, aff, lab: (a, aff), "halo": halo, "noise": noisy, "blurred": blurred,
    "rescaled": rescaled,
    "regridded": resampled(grid((0.8, 0.8, 1.2))),  # the 4x4x6 mm relative to its 5 mm voxels
    "thick-slices": resampled(grid((1.0, 1.0, 2.5))),  # slices 2.5x thicker, linear interpolation
    "brats-sized": brats_sized,
}
