"""The last step never depends on evaluation: sites with labelled, unlabelled or no held-out cases all keep their
final model, under every strategy; evaluation failures are reported, not fatal; a strategy failing everywhere
makes `mome sim` fail."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from flwr.app import Message

from mome.cli.main import main as mome
from mome.common.config import Strategy
from mome.sim.run_sim import simulate
from mome.sim.synth import generate_federation
from tests.conftest import TINY_OVERRIDES, TINY_RUN

LABELLED, UNLABELLED, NONE = "site-a", "site-b", "site-c"


@pytest.fixture(scope="module")
def heldout_kinds(tmp_path_factory) -> Path:
    """site-a: 2 labelled + 1 unlabelled held-out cases; site-b: 3 unlabelled (no labelsTs/); site-c: none."""
    root = tmp_path_factory.mktemp("heldout")
    sites = {d.name: d for d in generate_federation(root, sites=3, preset="mixed", seed=3, size=24, cases=4,
                                                     test_cases=3)}
    sorted((sites[LABELLED] / "labelsTs").glob("*.nii.gz"))[-1].unlink()
    shutil.rmtree(sites[UNLABELLED] / "labelsTs")
    shutil.rmtree(sites[NONE] / "labelsTs")
    shutil.rmtree(sites[NONE] / "imagesTs")
    return root


@pytest.fixture(scope="module")
def compare_run(heldout_kinds, tmp_path_factory) -> tuple[Path, int]:
    run_dir = tmp_path_factory.mktemp("compare")
    code = mome(["sim", "--data", str(heldout_kinds), "--out", str(run_dir), "--compare",
                 "--run-config", TINY_OVERRIDES])
    return run_dir, code


def _held_out_images(site: Path) -> dict[str, Path]:
    return {p.name[: -len("_0000.nii.gz")]: p for p in sorted((site / "imagesTs").glob("*_0000.nii.gz"))}


def test_check_data_counts_labelled_and_unlabelled_held_out_cases(heldout_kinds, capsys):
    assert mome(["check-data", *(str(heldout_kinds / s) for s in (LABELLED, UNLABELLED, NONE))]) == 0
    out = capsys.readouterr().out
    assert "3 held-out (2 labelled, 1 unlabelled)" in out
    assert "3 held-out (0 labelled, 3 unlabelled)" in out
    assert "0 held-out (0 labelled, 0 unlabelled)" in out


@pytest.mark.slow  # runs every strategy once (about 1.5 min, shared)
def test_every_strategy_completes_and_every_site_keeps_its_model(compare_run):
    run_dir, code = compare_run
    assert code == 0
    combined = json.loads((run_dir / "metrics.json").read_text())
    assert set(combined["strategies"]) == set(Strategy) and combined["failed"] == []
    assert "nan" not in (run_dir / "metrics.json").read_text().lower()
    for name, m in combined["strategies"].items():
        assert m["status"] == "ok", (name, m.get("error"))
        sites = m["sites"]
        assert set(sites) == {LABELLED, UNLABELLED, NONE}, name
        for site, entry in sites.items():
            assert entry["model_saved"] == 1, (name, site)
            assert (run_dir / name / "sites" / site / "model" / "metadata.json").is_file(), (name, site)
        assert sites[LABELLED]["status"] == "evaluated" and sites[LABELLED]["n_test"] == 2
        assert 0.0 <= sites[LABELLED]["dice_mean"] <= 1.0
        for site, why in ((UNLABELLED, "3 held-out case(s), none with a label file"), (NONE, "no held-out cases")):
            assert sites[site]["status"] == "no-held-out-labels" and why in sites[site]["reason"], (name, site)
            assert "dice_mean" not in sites[site] and "dice" not in sites[site], (name, site)
        summary = m["summary"]
        assert summary["n_evaluated"] == 1 and summary["n_models_saved"] == 3
        assert summary["worst_site"] == LABELLED and summary["dice_mean"] == sites[LABELLED]["dice_mean"]
    report = (run_dir / "report.md").read_text()
    assert "site-b: no-held-out-labels" in report and "FAILED" not in report
    rows = [line for line in report.splitlines() if re.match(rf"\| {UNLABELLED} \| \d+/\d+/\d+ \|", line)]
    header = next(line for line in report.splitlines() if line.startswith("| site | n train/val/test"))
    assert rows and all(row.count("|") == header.count("|") for row in rows), rows  # '–' where no metric


@pytest.mark.slow  # runs every strategy once (about 1.5 min, shared)
def test_unlabelled_held_out_cases_are_segmented_on_their_own_grid(compare_run, heldout_kinds):
    run_dir, _ = compare_run
    for name in Strategy:
        for site, expected in ((LABELLED, 1), (UNLABELLED, 3)):
            predictions = sorted((run_dir / name / "sites" / site / "predictions").glob("*.nii.gz"))
            assert len(predictions) == expected, (name, site)
            images = _held_out_images(heldout_kinds / site)
            for path in predictions:
                ref, out = nib.load(str(images[path.name[: -len(".nii.gz")]])), nib.load(str(path))
                assert out.shape == ref.shape and np.allclose(out.affine, ref.affine), (name, path)
        assert not (run_dir / name / "sites" / NONE / "predictions").exists()


@pytest.mark.slow  # runs every strategy once (about 1.5 min, shared)
@pytest.mark.parametrize("strategy", list(Strategy))
def test_predict_with_every_sites_bundle_keeps_the_input_geometry(compare_run, heldout_kinds, tmp_path, strategy):
    run_dir, _ = compare_run
    target = heldout_kinds / UNLABELLED
    for site in (LABELLED, UNLABELLED, NONE):
        out = tmp_path / site
        assert mome(["predict", "--model", str(run_dir / strategy / "sites" / site / "model"),
                     "--input", str(target), "--out", str(out), "--allow-missing"]) == 0  # this site has no FLAIR
        for case, image in _held_out_images(target).items():
            ref, seg = nib.load(str(image)), nib.load(str(out / f"{case}.nii.gz"))
            assert seg.shape == ref.shape and np.allclose(seg.affine, ref.affine), (strategy, site, case)


def break_evaluation(sites: dict[int, str], crash: bool = False):
    """A client mod: at the given partitions the evaluation of the final step raises (crash: the whole step)."""

    def mod(msg: Message, context, call_next) -> Message:
        site = sites.get(int(context.node_config["partition-id"]))
        if msg.metadata.message_type != "evaluate" or site is None:
            return call_next(msg, context)
        if crash:
            raise RuntimeError(f"the final step crashed at {site}")
        import mome.client.site as site_module  # patched inside the worker process that runs this site

        def broken(*args, **kwargs):
            raise KeyError("label")

        names = ("evaluate", "evaluate_each")  # a single model's scores, and a mixture's
        originals = {n: getattr(site_module, n) for n in names}
        for n in names:
            setattr(site_module, n, broken)
        try:
            return call_next(msg, context)
        finally:
            for n, original in originals.items():
                setattr(site_module, n, original)

    return mod


def test_failed_evaluation_still_saves_the_model_and_is_reported(two_sites, tmp_path):
    # half a plan given by hand (the patch still planned): the sites' surveyed copy must not be reused for training
    cfg = TINY_RUN.replace(gate_rounds=1, target_spacing="1,1,1")
    metrics = simulate("mome", two_sites, cfg, tmp_path, mods=[break_evaluation({0: two_sites[0].name})])
    broken, fine = (metrics["sites"][d.name] for d in two_sites)
    assert broken["status"] == "evaluation-failed" and "KeyError" in broken["reason"], broken
    assert broken["model_saved"] == 1 and "dice_mean" not in broken
    assert (tmp_path / "mome" / "sites" / two_sites[0].name / "model" / "metadata.json").is_file()
    assert fine["status"] == "evaluated" and metrics["status"] == "ok"
    assert metrics["summary"]["n_evaluated"] == 1 and metrics["summary"]["worst_site"] == two_sites[1].name


def test_final_step_failing_at_every_site_fails_the_strategy(two_sites, tmp_path):
    cfg = TINY_RUN.replace(gate_rounds=1)
    metrics = simulate("mome", two_sites, cfg, tmp_path,
                       mods=[break_evaluation({i: d.name for i, d in enumerate(two_sites)}, crash=True)])
    assert metrics["status"] == "failed" and "every site" in metrics["error"], metrics
    assert {e["status"] for e in metrics["sites"].values()} == {"failed"}
    assert "dice_mean" not in metrics["summary"]


def test_sim_reports_a_failed_strategy_in_red_and_exits_non_zero(heldout_kinds, tmp_path, monkeypatch, capsys):
    import mome.sim.run_sim as run_sim

    def crashing(strategy, *args, **kwargs):
        raise RuntimeError("no site answered")

    monkeypatch.setattr(run_sim, "simulate", crashing)
    code = mome(["sim", "--data", str(heldout_kinds), "--out", str(tmp_path), "--strategy", "fedavg",
                 "--run-config", TINY_OVERRIDES])
    assert code == 1
    assert "strategy fedavg FAILED: RuntimeError: no site answered" in capsys.readouterr().err
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["failed"] == ["fedavg"] and metrics["strategies"]["fedavg"]["status"] == "failed"
    assert '<span style="color:red">**FAILED**</span>' in (tmp_path / "report.md").read_text()
