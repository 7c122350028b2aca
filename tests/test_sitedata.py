"""The site data contract: valid sites load; each kind of bad input is named, skipped and left untouched."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import pytest

from mome.cli.main import main as mome
from mome.common.labels import label_spec_from_dataset_json
from mome.common.cases import load_site, split_train_val, to_batches
from mome.common.sitedata import SiteDataError
from tests.conftest import TINY, tree_checksums


def test_generated_sites_are_fully_usable(tiny_federation):
    for site in tiny_federation:
        data = load_site(site, TINY)
        meta = json.loads((site / "dataset.json").read_text())
        assert data.report.skipped == [], data.report.format()
        assert len(data.train) == meta["numTraining"]
        assert len(data.test) > 0
        assert set(data.report.modalities) == set(meta["channel_names"].values())
        case = data.train[0]  # on the canonical grid: cropped to the head, which fills most of the 24 mm box
        assert case["image"].shape[0] == 4 and all(12 <= s <= 24 for s in case["image"].shape[1:])
        assert case["label"].shape == case["image"].shape[1:] and case["label"].dtype == torch.int16
        assert case["presence"].shape == (5,) and case["summary"].shape == (4, *(TINY.gate_pool,) * 3)
        for c in data.train:  # an absent sequence is a zero channel and a zero presence bit
            for m in np.flatnonzero(c["presence"][:4].numpy() == 0):
                assert float(c["image"][m].abs().sum()) == 0.0


def test_missing_modality_site_has_no_flair(tiny_federation):
    no_flair = [s for s in tiny_federation if "FLAIR" not in load_site(s, TINY).report.modalities]
    assert no_flair, "the mixed preset should have a site without FLAIR"
    data = load_site(no_flair[0], TINY)
    assert all(float(c["presence"][3]) == 0.0 for c in data.train)


def _first_case_files(site: Path) -> tuple[str, list[Path]]:
    files = sorted((site / "imagesTr").glob("*_0000.nii.gz"))
    case = files[0].name[: -len("_0000.nii.gz")]
    return case, sorted((site / "imagesTr").glob(f"{case}_*.nii.gz"))


def _resave(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(data, affine), str(path))


def _corrupt_truncated(site, case, files):
    raw = files[0].read_bytes()
    files[0].write_bytes(raw[: len(raw) // 2])
    return files[0], "unreadable or truncated"


def _corrupt_shape(site, case, files):
    img = nib.load(str(files[1]))
    _resave(files[1], np.asarray(img.dataobj)[:-2], img.affine)
    return files[1], "shape"


def _corrupt_affine(site, case, files):
    img = nib.load(str(files[1]))
    affine = img.affine.copy()
    affine[0, 3] += 5.0
    _resave(files[1], np.asarray(img.dataobj), affine)
    return files[1], "affine differs"


def _corrupt_nan(site, case, files):
    img = nib.load(str(files[0]))
    data = np.asarray(img.dataobj).copy()
    data[3, 3, 3] = np.nan
    _resave(files[0], data, img.affine)
    return files[0], "NaN/inf"


def _corrupt_label_value(site, case, files):
    path = site / "labelsTr" / f"{case}.nii.gz"
    img = nib.load(str(path))
    data = np.asarray(img.dataobj).copy()
    data[0, 0, 0] = 7
    _resave(path, data, img.affine)
    return path, "not declared in dataset.json"


def _corrupt_missing_channel(site, case, files):
    files[-1].unlink()
    return files[-1], "missing channel file"


def _corrupt_missing_label(site, case, files):
    path = site / "labelsTr" / f"{case}.nii.gz"
    path.unlink()
    return path, "missing label file"


CORRUPTIONS = [_corrupt_truncated, _corrupt_shape, _corrupt_affine, _corrupt_nan,
               _corrupt_label_value, _corrupt_missing_channel, _corrupt_missing_label]


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__[len("_corrupt_"):])
def test_bad_case_is_named_skipped_and_untouched(site_copy, corrupt, capsys):
    n_before = len(load_site(site_copy, TINY).train)
    case, files = _first_case_files(site_copy)
    bad_file, reason = corrupt(site_copy, case, files)
    before = tree_checksums(site_copy)
    data = load_site(site_copy, TINY)
    assert tree_checksums(site_copy) == before, "reading a site must not modify it"
    assert [c for c, _, _ in data.report.skipped] == [case]
    _, path, message = data.report.skipped[0]
    assert path == str(bad_file) and reason in message
    assert len(data.train) == n_before - 1 and case not in data.report.usable["Tr"]
    assert mome(["check-data", str(site_copy)]) == 0
    assert str(bad_file) in capsys.readouterr().out


def test_clinical_rows_and_cases_that_do_not_match(site_copy):
    path = site_copy / "clinical.csv"
    lines = path.read_text().splitlines()
    header, first, rest = lines[0], lines[1], lines[2:]
    dropped = first.split(",")[0]
    path.write_text("\n".join([header, *rest, "ghost_999," + ",".join(first.split(",")[1:])]) + "\n")
    data = load_site(site_copy, TINY)
    text = "\n".join(data.report.warnings)
    assert f"no row for case {dropped}" in text and "ghost_999" in text
    case = next(c for c in data.train + data.test if c["case_id"] == dropped)
    assert float(case["presence"][-1]) == 0.0 and float(case["clinical"].abs().sum()) == 0.0
    assert data.report.skipped == []


def test_malformed_dataset_json_names_the_file(site_copy, capsys):
    (site_copy / "dataset.json").write_text('{"channel_names": {"0": "T1"}, "labels": ')
    with pytest.raises(SiteDataError, match="dataset.json: malformed"):
        load_site(site_copy, TINY)
    assert mome(["check-data", str(site_copy)]) == 1
    assert "malformed dataset.json" in capsys.readouterr().out


def test_empty_folder_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SiteDataError, match="dataset.json: missing"):
        load_site(tmp_path, TINY)
    assert mome(["check-data", str(tmp_path)]) == 1


def test_site_with_every_case_bad_exits_nonzero(site_copy, capsys):
    for path in (site_copy / "labelsTr").glob("*.nii.gz"):
        path.unlink()
    assert mome(["check-data", str(site_copy)]) == 1
    assert "missing label file" in capsys.readouterr().out


def test_region_targets_round_trip_to_label_values():
    spec = label_spec_from_dataset_json({"labels": {"background": 0, "wt": [1, 2, 3], "tc": [2, 3],
                                                    "et": 3}, "regions_class_order": [1, 2, 3]})
    label = np.random.default_rng(0).integers(0, 4, size=(5, 5, 5))
    target = spec.to_target(label)
    assert spec.kind == "regions" and target.shape == (3, 5, 5, 5)
    assert (spec.to_label_map(target) == label).all()
    classes = label_spec_from_dataset_json({"labels": {"background": 0, "tumour": 1}})
    onehot = classes.to_target(label.clip(0, 1))
    assert classes.kind == "classes" and (classes.to_label_map(onehot) == label.clip(0, 1)).all()


def test_split_and_batches_are_deterministic(tiny_federation):
    data = load_site(tiny_federation[0], TINY)
    a = split_train_val(data.train, 0.25, seed=3)
    b = split_train_val(data.train, 0.25, seed=3)
    assert [c["case_id"] for c in a[0]] == [c["case_id"] for c in b[0]] and len(a[1]) >= 1
    batches = to_batches(a[0], 2, data.label_spec, 8)
    assert batches[0]["image"].shape[0] == min(2, len(a[0]))
    assert all(s % 8 == 0 for s in batches[0]["image"].shape[2:])  # padded to what the expert takes
    assert batches[0]["label"].shape[1:] == (data.label_spec.n_out, *batches[0]["image"].shape[2:])


def test_a_misspelled_clinical_column_is_named_and_check_data_fails(site_copy, capsys):
    path = site_copy / "clinical.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0].replace("age", "Age_years"), *lines[1:]]) + "\n")
    data = load_site(site_copy, TINY)
    assert data.report.contract == [f"{path}: column 'age' of the clinical contract is missing (did you mean "
                                    f"'Age_years'?); columns: Age_years, case_id, risk, sex"]
    assert mome(["check-data", str(site_copy)]) == 1
    assert "contract: " in capsys.readouterr().out


def test_files_of_another_format_are_named_with_what_mome_reads(site_copy, capsys):
    images = site_copy / "imagesTr"
    n_train = len(load_site(site_copy, TINY).report.usable["Tr"])
    (images / "extra_0000.mha").write_bytes(sorted(images.iterdir())[0].read_bytes())
    (site_copy / "labelsTr" / "extra.nrrd").write_bytes(b"NRRD0004")
    assert mome(["check-data", str(site_copy)]) == 0  # the NIfTI cases are still usable
    out = capsys.readouterr().out
    assert "warning: imagesTr/extra_0000.mha: a .mha file, not used; a case is <case>_<cccc>.nii.gz" in out
    assert "warning: labelsTr/extra.nrrd: a .nrrd file, not used" in out and "dcm2niix" in out
    assert f"usable: {n_train} training" in out
