"""Tests of the synthetic federation generator: determinism, on-disk contract, conventions, presets, preview."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mome.sim import synth
from mome.sim.preview import write_preview
from mome.sim.synth import PRESETS, SEQUENCES, SiteSpec, generate_federation, generate_site, preset_sites

SIZE = 24


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _label(site: Path, case: str, split: str = "Tr") -> np.ndarray:
    return np.asarray(nib.load(site / f"labels{split}" / f"{case}.nii.gz").dataobj)


def _clinical(site: Path) -> dict[str, dict[str, str]]:
    with (site / "clinical.csv").open(newline="") as fh:
        return {row["case_id"]: row for row in csv.DictReader(fh)}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> list[Path]:
    """The default mixed federation (4 sites, default case counts) at a small size."""
    return generate_federation(tmp_path_factory.mktemp("mixed"), size=SIZE)


def test_same_seed_is_byte_identical_and_seed_matters(tmp_path):
    kwargs = dict(sites=2, preset="mixed", size=SIZE, cases=2, test_cases=1)
    generate_federation(tmp_path / "a", seed=3, **kwargs)
    generate_federation(tmp_path / "b", seed=3, **kwargs)
    generate_federation(tmp_path / "c", seed=4, **kwargs)
    a, b, c = (_hashes(tmp_path / x) for x in "abc")
    assert a == b and len(a) > 10
    images = [k for k in a.keys() & c.keys() if k.endswith(".nii.gz")]  # missing channels differ too
    assert len(images) > 10 and all(a[k] != c[k] for k in images)


def test_dataset_json_matches_files(mixed):
    for site in mixed:
        meta = json.loads((site / "dataset.json").read_text())
        assert meta["name"] == site.name and meta["file_ending"] == ".nii.gz"
        names = meta["channel_names"]
        assert list(names) == [str(i) for i in range(len(names))]
        rows = _clinical(site)
        n_train, n_test = meta["numTraining"], meta["synthetic"]["n_test"]
        assert len(rows) == n_train + n_test
        assert len(list((site / "labelsTr").glob("*.nii.gz"))) == n_train
        assert len(list((site / "labelsTs").glob("*.nii.gz"))) == n_test
        for case, row in rows.items():
            split = "Tr" if int(case.rsplit("_", 1)[1]) < n_train else "Ts"
            assert float(row["age"]) > 0 and row["sex"] in "FM" and row["risk"] in ("low", "high")
            label_img = nib.load(site / f"labels{split}" / f"{case}.nii.gz")
            label = np.asarray(label_img.dataobj)
            assert label.dtype == np.uint8 and set(np.unique(label)) <= {0, 1, 2, 3} and label.any()
            lacks = meta["missing_channels"].get(case, [])
            assert names["0"] not in lacks and len(lacks) < len(names)
            head = None
            for k, seq in names.items():
                path = site / f"images{split}" / f"{case}_{int(k):04d}.nii.gz"
                assert path.exists() == (seq not in lacks), path
                if path.exists():
                    img = nib.load(path)
                    assert img.get_data_dtype() == np.float32
                    factor = meta["synthetic"]["slice_factor"]
                    assert img.shape == label.shape and sorted(img.shape) == sorted((SIZE, SIZE, SIZE // factor))
                    assert "".join(nib.aff2axcodes(img.affine)) == meta["synthetic"]["orientation"]
                    assert np.allclose(img.affine, label_img.affine)
                    nonzero = np.asarray(img.dataobj) != 0
                    head = nonzero if head is None else head
                    assert (nonzero == head).all()  # background is exactly 0, same head on all channels
            assert not (label.astype(bool) & ~head).any()
        files = {p.name for p in site.glob("images*/*.nii.gz")}
        expected = {f"{c}_{int(k):04d}.nii.gz" for c in rows for k, s in names.items()
                    if s not in meta["missing_channels"].get(c, [])}
        assert files == expected


def _pair(tmp_path: Path, convention: str, margin: int, n: int = 8) -> tuple[Path, Path]:
    """The same site (same anatomy) written under 'standard' and under `convention`."""
    base = SiteSpec(index=0, site_id="site-a", n_train=n, n_test=0)
    std = generate_site(base, tmp_path / "standard", SIZE, seed=11)
    other = generate_site(dataclasses.replace(base, convention=convention, margin=margin),
                          tmp_path / convention, SIZE, seed=11)
    return std, other


def test_margin_convention_enlarges_core(tmp_path):
    std, margin = _pair(tmp_path, "margin", 2, n=3)
    for i in range(3):
        a, b = _label(std, f"site-a_{i:03d}"), _label(margin, f"site-a_{i:03d}")
        assert (b >= 2).sum() > (a >= 2).sum()
        assert ((a >= 2) <= (b >= 2)).all() and ((a == 3) == (b == 3)).all()


def test_oedema_in_core_merges_regions(tmp_path):
    std, merged = _pair(tmp_path, "oedema-in-core", 0, n=3)
    for i in range(3):
        a, b = _label(std, f"site-a_{i:03d}"), _label(merged, f"site-a_{i:03d}")
        assert ((b >= 2) == (b >= 1)).all() and ((b >= 1) == (a >= 1)).all()


def test_risk_margin_follows_clinical_risk(tmp_path):
    std, risky = _pair(tmp_path, "risk-margin", 3)
    rows = _clinical(risky)
    assert _clinical(std) == rows  # clinical draws do not depend on the convention
    assert {r["risk"] for r in rows.values()} == {"low", "high"}
    for case, row in rows.items():
        a, b = _label(std, case), _label(risky, case)
        ratio = (b >= 2).sum() / (a >= 2).sum()
        assert (ratio > 1) == (row["risk"] == "high")
        if row["risk"] == "low":
            assert (a == b).all()


def test_images_do_not_depend_on_convention(tmp_path):
    std, margin = _pair(tmp_path, "margin", 2, n=1)
    for k in range(len(SEQUENCES)):
        name = f"imagesTr/site-a_000_{k:04d}.nii.gz"
        assert (std / name).read_bytes() == (margin / name).read_bytes()


def test_contrasts_look_like_mri(tmp_path):
    rng = np.random.default_rng(0)
    anat = synth.make_case(rng, 32)
    spec = SiteSpec(index=0, site_id="site-a", noise=0.0, bias=0.0)
    flat = np.ones(anat.label.shape, np.float32)
    img = {s: synth.render(anat, s, spec, flat, np.random.default_rng(1)) for s in SEQUENCES}

    def mean(seq: str, tissue: int) -> float:
        return float(img[seq][anat.tissue == tissue].mean())

    assert mean("T1", synth.WM) > mean("T1", synth.CSF) and mean("T2", synth.CSF) > mean("T2", synth.WM)
    assert mean("FLAIR", synth.OEDEMA) > mean("FLAIR", synth.CSF)
    assert (img["T1ce"][anat.label == 3].mean() > img["T1"][anat.label == 3].mean())
    assert (img["T1"][~anat.head] == 0).all()


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_generates(tmp_path, preset):
    sites = generate_federation(tmp_path, sites=3, preset=preset, size=16, cases=2, test_cases=1)
    assert [s.name for s in sites] == ["site-a", "site-b", "site-c"]
    assert all((s / "dataset.json").exists() for s in sites)


def test_mixed_has_every_kind_of_heterogeneity(mixed):
    metas = [json.loads((s / "dataset.json").read_text()) for s in mixed]
    assert any("FLAIR" not in m["channel_names"].values() for m in metas)
    assert any(4 <= m["numTraining"] <= 6 for m in metas)
    assert metas[-1]["numTraining"] == 5
    assert any(m["synthetic"]["convention"] != "standard" for m in metas)
    assert any(m["missing_channels"] for m in metas)
    assert len({m["synthetic"]["spacing"] for m in metas}) > 1


def test_preset_table_and_overrides():
    specs = preset_sites("mixed", 4, cases=9, test_cases=2)
    assert [s.convention for s in specs] == ["standard", "standard", "risk-margin", "margin"]
    assert [s.n_train for s in specs] == [9, 9, 9, 5] and {s.n_test for s in specs} == {2}
    assert specs[1].channels == SEQUENCES[:3] and specs[2].missing_rate > 0
    assert len({s.spacing for s in preset_sites("iid", 3)}) == 1
    assert preset_sites("few-shot", 3, cases=3)[-1].n_train == 3
    conv = [s.convention for s in preset_sites("convention-shift", 5)]
    assert conv[:2] == ["standard", "standard"] and set(conv[2:]) == {"margin", "oedema-in-core", "risk-margin"}


def test_bad_preset_lists_valid_ones():
    with pytest.raises(ValueError, match="scanner-shift"):
        preset_sites("nope", 2)
    with pytest.raises(ValueError):
        generate_federation(Path("/nonexistent"), preset="nope")


def test_preview_png(mixed, tmp_path):
    png = write_preview(mixed, tmp_path / "preview.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_scanner_geometry_keeps_every_voxel_in_place():
    """LPS / permuted storage and thick slices change the array and its affine, never where tissue lies."""
    from mome.sim.scanner import reorient, thick_slices

    rng = np.random.default_rng(0)
    array, affine = rng.random((6, 8, 9)).astype(np.float32), np.diag([1.2, 1.0, 0.8, 1.0])
    affine[:3, 3] = (-3.0, 4.0, 1.0)
    for code in ("LPS", "ASL", "PIR"):
        out, out_affine = reorient(array, affine, code)
        assert "".join(nib.aff2axcodes(out_affine)) == code
        # the world position of voxel (1, 2, 3) of the RAS array is found again in the reoriented one
        world = affine @ np.array([1, 2, 3, 1.0])
        index = np.round(np.linalg.inv(out_affine) @ world).astype(int)[:3]
        assert out[tuple(index)] == array[1, 2, 3]
    thick, thick_affine = thick_slices(array, affine, 3, label=False)
    assert thick.shape == (6, 8, 3) and np.isclose(thick_affine[2, 2], 2.4)
    assert np.isclose(thick[1, 2, 0], array[1, 2, 0:3].mean())
    centre = thick_affine @ np.array([0, 0, 0, 1.0])
    assert np.allclose(centre, affine @ np.array([0, 0, 1, 1.0]))  # middle of the first three slices
