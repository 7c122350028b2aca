"""The clinical-resolution data path: any scanner geometry in, predictions on the input's own grid; the plan."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.processing import resample_from_to

from mome.client.predict import predict
from mome.client.site import Site
from mome.common.bundle import Bundle, save_bundle
from mome.common.cases import load_site
from mome.common.config import Config
from mome.common.state import state_to_numpy
from mome.server.plan import make_plan, site_geometry
from mome.sim.perturb import VARIANTS, grid, resampled, write_case
from mome.sim.scanner import reorient, save_scan
from mome.sim.synth import SiteSpec, generate_site

# the small model of these tests: no modality dropout and no blur augmentation (both slow a model this small; the
# tests are about geometry, and this recipe was measured at 0.78-0.85 whole-tumour Dice, every region found)
SMALL = Config(channels="8,16,32", stem_channels=4, target_spacing="3,3,3", patch_size="32,32,32", batch_size=2,
               min_cases=1, modality_dropout=0.0, aug_blur=0.0)
TRAIN_CASES, SCHEDULE = 16, ((0.01, 20), (0.002, 10))  # (lr, epochs) in turn
WHOLE_TUMOUR_FLOOR = 0.5  # a model that finds the whole tumour: the orientation and perturbation checks mean something


# -- the plan -----------------------------------------------------------------------------------------------------
def test_plan_of_isotropic_sites_is_their_median_and_fits_the_budget():
    sites = [{"spacing": [s] * 3, "extent_mm": [150.0, 180.0, 140.0]} for s in (0.9, 1.0, 1.2)]
    plan = make_plan(sites, Config(max_patch_voxels=10**9))
    assert plan["target_spacing"] == [1.0, 1.0, 1.0]
    assert plan["patch_size"] == [152, 160, 144]  # the median head, rounded up to the divisor 8, sides <= 160
    small = make_plan(sites, Config(max_patch_voxels=96**3))
    assert np.prod(small["patch_size"]) <= 96**3 and all(p % 8 == 0 for p in small["patch_size"])
    # shrunk along the side longest relative to the head: the aspect ratio survives
    assert small["patch_size"][1] >= small["patch_size"][0] >= small["patch_size"][2] - 8


def test_plan_of_anisotropic_sites_keeps_thin_slices():
    """nnU-Net's rule: a coarse axis more than 3x the finest is planned at its 10th percentile, not the median."""
    sites = [{"spacing": [0.5, 0.5, z], "extent_mm": [200.0, 200.0, 150.0]} for z in (2.0, 5.0, 5.0, 6.0)]
    plan = make_plan(sites, Config(max_patch_voxels=10**9))
    assert plan["target_spacing"][:2] == [0.5, 0.5]
    assert 2.0 <= plan["target_spacing"][2] < 5.0  # the median (5.0) would throw the thin-slice site away
    mild = make_plan([{"spacing": [1.0, 1.0, z], "extent_mm": [150.0] * 3} for z in (1.5, 2.0, 2.5)], Config())
    assert mild["target_spacing"] == [1.0, 1.0, 2.0]  # not anisotropic: plain median
    assert make_plan([], Config())["target_spacing"] == [1.0, 1.0, 1.0]  # nobody reported geometry
    kept = make_plan(sites, Config(target_spacing="1,1,1", patch_size="64,64,32"))
    assert kept["target_spacing"] == [1.0, 1.0, 1.0] and kept["patch_size"] == [64, 64, 32]


def test_unbelievable_geometry_is_ignored():
    assert site_geometry({"spacing": [1.0, 1.0, 1.0], "extent_mm": [150.0, 150.0, 150.0]}) is not None
    for bad in ({"spacing": [float("nan")] * 3, "extent_mm": [150.0] * 3}, {"spacing": [1.0] * 3},
                {"spacing": [0.0, 1.0, 1.0], "extent_mm": [150.0] * 3}, {"spacing": [1.0] * 2, "extent_mm": [1.0] * 3},
                {"spacing": [1.0] * 3, "extent_mm": [1e9] * 3}, {"spacing": "x", "extent_mm": [1.0] * 3}):
        assert site_geometry(bad) is None


# -- a small model trained here, then the same case in other geometries --------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(bundle folder, site folder): an expert trained on a 32^3 synthetic site of 3 mm voxels, long enough that it
    clearly finds the whole tumour (held-out whole-tumour Dice 0.78-0.85 over two seeds and two thread counts, against
    the tests' floor of 0.5). No pick of a best epoch on 3 validation cases (that pick followed the noise and made the model a
    lottery of summation order); a last stretch at a lower lr settles the weights instead."""
    root = tmp_path_factory.mktemp("geometry")
    site_dir = generate_site(SiteSpec(index=0, site_id="site-a", n_train=TRAIN_CASES, n_test=3), root / "data", 32,
                             seed=5)
    _scale_voxels(site_dir, 3.0)
    site = Site.open(site_dir, SMALL)
    model = site.expert()
    from mome.common.train import train_expert

    for step, (lr, epochs) in enumerate(SCHEDULE):
        train_expert(model, site.patches(f"train-{step}"), [], SMALL.replace(lr=lr), site.kind, epochs=epochs,
                     progress=False)
    bundle = save_bundle(Bundle(SMALL, site.data.label_spec, {"shared": state_to_numpy(model)}, None, "fedavg"),
                         root / "model")
    return bundle, site_dir


def _scale_voxels(site_dir: Path, mm: float) -> None:
    """The same arrays as scans of `mm` voxels (synthetic anatomy has no scale of its own): a 96 mm head whose tumour
    is 20-30 mm across, so a 3 mm slice is small against it, as in a clinical scan."""
    for path in sorted(site_dir.glob("*/*.nii.gz")):
        img = nib.load(path)
        affine = img.affine.copy()
        affine[:3] *= mm
        save_scan(np.asarray(img.dataobj), affine, path)


def _region_dice(a: np.ndarray, b: np.ndarray, members: list[int]) -> float:
    x, y = np.isin(a, members), np.isin(b, members)
    return 1.0 if not x.any() and not y.any() else float(2 * (x & y).sum() / (x.sum() + y.sum()))


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Dice over the regions (whole tumour, core, enhancing) of two label maps; both empty counts 1."""
    return float(np.mean([_region_dice(a, b, m) for m in ([1, 2, 3], [2, 3], [3])]))


def _predict(bundle: Path, folder: Path, case: str) -> nib.Nifti1Image:
    written, problems = predict(bundle, [folder], folder / "pred")
    assert not problems and len(written) == 1
    return nib.load(written[0])


def test_prediction_is_on_the_input_grid_and_the_same_in_any_orientation(trained, tmp_path, quality):
    bundle, site_dir = trained
    case = f"site-a_{TRAIN_CASES:03d}"  # the first held-out case
    original = write_case(tmp_path / "ras", site_dir, case, lambda a, aff, lab: (a, aff))
    reference = _predict(bundle, original, case)
    ras_image = nib.load(original / "imagesTs" / f"{case}_0000.nii.gz")
    truth = np.asarray(nib.load(original / "labelsTs" / f"{case}.nii.gz").dataobj)
    ras = np.asarray(reference.dataobj)
    # worth comparing: it finds the whole tumour, and predicts every region (two empty maps would agree for free)
    quality("whole-tumour Dice", _region_dice(ras, truth, [1, 2, 3]), WHOLE_TUMOUR_FLOOR)
    assert all(np.isin(ras, m).any() for m in ([1, 2, 3], [2, 3], [3]))
    variants = {code: (lambda a, aff, lab, code=code: reorient(a, aff, code)) for code in ("LPS", "ASL", "PIR")}
    variants["1x1x3mm"] = resampled(grid((1 / 3, 1 / 3, 1)))
    for name, transform in variants.items():
        folder = write_case(tmp_path / name, site_dir, case, transform)
        given = nib.load(folder / "imagesTs" / f"{case}_0000.nii.gz")
        pred = _predict(bundle, folder, case)
        assert pred.shape == given.shape and np.allclose(pred.affine, given.affine), name
        assert np.allclose(pred.header.get_sform(), given.header.get_sform()), name
        assert int(pred.header["qform_code"]) == int(given.header["qform_code"]) == 1
        back = np.asarray(resample_from_to(pred, (ras_image.shape, ras_image.affine), order=0).dataobj)
        assert _dice(back, ras) >= 0.95 and (back == ras).mean() >= 0.99, name


def test_bad_geometry_is_named_and_skipped(trained, tmp_path):
    _, site_dir = trained
    site = tmp_path / "site"
    shutil.copytree(site_dir, site)
    cases = sorted({p.name.rsplit("_", 1)[0] for p in (site / "imagesTr").glob("*.nii.gz")})
    broken = {cases[0]: "singular", cases[1]: "zero", cases[2]: "nan", cases[3]: "empty"}
    for case, how in broken.items():
        for path in sorted((site / "imagesTr").glob(f"{case}_*.nii.gz")) + [site / "labelsTr" / f"{case}.nii.gz"]:
            img = nib.load(path)
            data, affine = np.asarray(img.dataobj), img.affine.copy()
            if how == "singular":
                affine[:3, 2] = affine[:3, 0]  # two axes pointing the same way
            elif how == "zero":
                affine[:3, 1] = 0.0
            elif how == "nan":
                affine[0, 3] = np.nan
            elif how == "empty" and "labelsTr" not in str(path):
                data = np.zeros_like(data)
            header = nib.Nifti1Header()
            header.set_data_shape(data.shape)
            header.set_data_dtype(data.dtype)
            for row, name in enumerate(("srow_x", "srow_y", "srow_z")):  # written as is: nibabel would refuse
                header[name] = affine[row]
            header["sform_code"], header["qform_code"] = 1, 0
            nib.save(nib.Nifti1Image(data, None, header=header), path)
    data = load_site(site, SMALL)
    reasons = {case: reason for case, _, reason in data.report.skipped}
    assert set(reasons) == set(broken), data.report.format()
    assert "singular" in reasons[cases[0]] and "zero axis" in reasons[cases[1]]
    assert "NaN/inf" in reasons[cases[2]] and "head is empty" in reasons[cases[3]]
    assert len(data.train) == TRAIN_CASES - 4  # the rest is used


def test_scores_survive_resampling_halo_noise_and_another_grid(trained, tmp_path, quality):
    """A resampled scan's halo once collapsed the prediction (Dice 0.84 -> 0.00), a 4x4x6 mm copy of a 5 mm case fell
    to 0.25. Each variant is scored on its own grid against its own label, against floors relative to the original
    grid's scores (below). The other grid is 4x4x6 mm relative to 5 mm voxels: (0.8, 0.8, 1.2) x the spacing."""
    bundle, site_dir = trained
    cases = sorted({p.name.rsplit("_", 1)[0] for p in (site_dir / "imagesTs").glob("*.nii.gz")})
    variants = {k: VARIANTS[k] for k in ("original", "halo", "noise", "regridded")}
    scores, whole = {}, {}
    for name, transform in variants.items():
        dice, wt = [], []
        for case in cases:
            folder = write_case(tmp_path / name / case, site_dir, case, transform)
            pred = np.asarray(_predict(bundle, folder, case).dataobj)
            truth = np.asarray(nib.load(folder / "labelsTs" / f"{case}.nii.gz").dataobj)
            dice.append(_dice(pred, truth))
            wt.append(_region_dice(pred, truth, [1, 2, 3]))
        scores[name], whole[name] = float(np.mean(dice)), float(np.mean(wt))
    # a model this small finds the whole tumour, not yet the thin core: both measures must hold up
    quality("whole-tumour Dice, original grid", whole["original"], WHOLE_TUMOUR_FLOOR)
    # floors relative to the original grid's own scores, from the spread over two seeds and two thread counts: the
    # whole tumour loses at most 0.011 to the halo and noise, the mean over regions (a thin enhancing rim at 3 mm)
    # up to 0.039; the coarser slices of the other grid cost up to 0.09 and 0.13. That is the networks' weakness to
    # smoothing (issue #24); here the test guards against the collapse it was written for (0.84 -> 0.25 or 0.00).
    tolerance = {"halo": (0.06, 0.03), "noise": (0.06, 0.03), "regridded": (0.2, 0.15)}  # (mean, whole tumour)
    for name, (mean_tol, whole_tol) in tolerance.items():
        quality(f"mean Dice, {name}", scores[name], scores["original"] - mean_tol)
        quality(f"whole-tumour Dice, {name}", whole[name], whole["original"] - whole_tol)


def test_the_gates_intensity_cues_have_no_unit(trained):
    """MRI intensities have no unit: the same scans exported x1000 (or /7) must route the same; the cues still tell
    scanners with other contrast apart."""
    from mome.common.preprocess import case_geometry

    _, site_dir = trained
    case = sorted(p.name for p in (site_dir / "imagesTs").glob("*_0000.nii.gz"))[0].rsplit("_", 1)[0]
    channels = sorted((site_dir / "imagesTs").glob(f"{case}_*.nii.gz"))
    image = np.stack([np.asarray(nib.load(p).dataobj, dtype=np.float32) for p in channels])
    affine, present = nib.load(channels[0]).affine, np.ones(len(channels), dtype=np.float32)
    cues = case_geometry(image, affine, present)["stats"]
    for factor in (1000.0, 1 / 7):
        assert np.allclose(case_geometry(image * factor, affine, present)["stats"], cues, atol=1e-5)
    other_contrast = case_geometry(image ** 1.5, affine, present)["stats"]
    assert np.abs(other_contrast - cues).max() > 0.05 and np.isfinite(cues).all() and np.abs(cues).max() > 0
