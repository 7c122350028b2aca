"""`mome bench`: a scored run per preset and seed, paired intervals that can tell strategies apart, the report."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest

from mome.cli.main import main as mome
from mome.sim.bench import BenchPlan, run_bench
from mome.sim.bench_report import case_dice, load_results, paired_interval, summarise, verdict
from tests.conftest import TINY_RUN


def _sites(values: dict[str, list[float]]) -> dict[str, np.ndarray]:
    return {site: np.asarray(v) for site, v in values.items()}


def test_paired_interval_separates_a_consistent_lead_from_noise():
    rng = np.random.default_rng(0)
    base = [_sites({"a": rng.uniform(0.4, 0.8, 12), "b": rng.uniform(0.2, 0.6, 12)}) for _ in range(3)]
    ahead = [{s: v + 0.05 for s, v in seed.items()} for seed in base]
    noisy = [{s: v + rng.normal(0, 0.05, v.shape) for s, v in seed.items()} for seed in base]
    lead = paired_interval(ahead, base, np.random.default_rng(1), reps=2000)
    assert lead["mean"][0] == pytest.approx(0.05) and lead["worst"][0] == pytest.approx(0.05)
    assert lead["mean"][1] > 0 and verdict(lead["mean"]) == "MoME ahead"
    tie = paired_interval(noisy, base, np.random.default_rng(1), reps=2000)
    assert tie["mean"][1] < 0 < tie["mean"][2] and verdict(tie["mean"]) == "no clear difference"
    behind = paired_interval(base, ahead, np.random.default_rng(1), reps=2000)
    assert "behind" in verdict(behind["worst"])


def test_a_site_without_a_model_scores_zero_not_missing():
    run = {"scores": {"mome": {"site-a": [[0.8, 0.6, 0.4]] * 2, "site-b": [[0.5, 0.5, 0.5]]},
                      "local": {"site-a": None, "site-b": [[0.7, 0.7, 0.7]]}}}
    dice = case_dice(run)
    assert dice["local"]["site-a"].tolist() == [0.0, 0.0]
    assert dice["mome"]["site-a"].tolist() == pytest.approx([0.6, 0.6])


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    overrides = {k: v for k, v in TINY_RUN.to_run_config().items() if k != "strategy" and v != ""}
    plan = BenchPlan(presets=("mixed",), seeds=(0,), strategies=("mome", "local"), sites=2, cases=4,
                     overrides=overrides)
    return plan, out, run_bench(plan, out)


def test_bench_scores_every_case_as_the_sites_own_evaluation_does(bench_run):
    _, out, results = bench_run
    assert sorted(results["mixed"]) == [0]
    for seed, run in results["mixed"].items():
        metrics = json.loads((out / "mixed" / f"seed-{seed}" / "metrics.json").read_text())["strategies"]
        for strategy in ("mome", "local"):
            for site, cases in run["scores"][strategy].items():
                assert len(cases) == metrics[strategy]["sites"][site]["n_test"]
                reported = metrics[strategy]["sites"][site]["dice_mean"]
                assert np.mean(cases) == pytest.approx(reported, abs=1e-5)
        assert set(run["scores"]) == {"mome", "local", "local-ensemble"}
        late = run["late_join"]["scores"]  # the hospital that joined late, before and after `mome adapt`
        assert set(late) == {"mome-adapted", "mome-given"} and len(late["mome-adapted"]) == len(late["mome-given"]) > 0
        assert run["cost"]["mome"]["bytes"] > 0 == run["cost"]["local"]["bytes"]


def test_a_finished_run_is_reused_and_the_report_is_written(bench_run, tmp_path):
    plan, out, results = bench_run
    stamp = (out / "mixed" / "seed-0" / "metrics.json").stat().st_mtime_ns
    assert run_bench(plan, out) == results
    assert (out / "mixed" / "seed-0" / "metrics.json").stat().st_mtime_ns == stamp
    assert load_results(out) == results
    summary = summarise(results)
    assert set(summary["mixed"]["versus"]) == {"local", "local-ensemble"}
    code = mome(["bench", "--presets", "mixed", "--seeds", "1", "--strategies", "mome,local", "--sites", "2",
                 "--cases", "4", "--out", str(out), "--docs", str(tmp_path),
                 "--run-config", " ".join(f"{k}={v}" for k, v in plan.overrides.items())])
    assert code == 0
    text = (tmp_path / "results.md").read_text()
    assert "## mixed (1 seed: 0)" in text and "| local-ensemble |" in text and "Late join" in text
    assert (tmp_path / "bench.png").stat().st_size > 10_000
    assert (out / "mixed" / "seed-0" / "metrics.json").stat().st_mtime_ns == stamp  # the CLI reused it too


def test_a_run_stored_without_the_late_join_gets_it_and_keeps_its_training(bench_run, tmp_path):
    plan, out, results = bench_run
    copy = tmp_path / "bench"
    shutil.copytree(out, copy)
    scores = copy / "mixed" / "seed-0" / "case_scores.json"
    stored = json.loads(scores.read_text())
    scores.write_text(json.dumps({**stored, "late_join": {}}))  # as `mome bench --no-late-join` leaves it
    trained = (copy / "mixed" / "seed-0" / "metrics.json").stat().st_mtime_ns
    assert run_bench(replace(plan, late_join=False), copy)["mixed"][0]["late_join"] == {}
    again = run_bench(plan, copy)["mixed"][0]
    assert set(again["late_join"]["scores"]) == {"mome-adapted", "mome-given"}
    assert again["scores"] == results["mixed"][0]["scores"]
    assert (copy / "mixed" / "seed-0" / "metrics.json").stat().st_mtime_ns == trained


def test_bench_refuses_bad_input_before_training(tmp_path, capsys):
    assert mome(["bench", "--presets", "mixed,bogus", "--out", str(tmp_path)]) == 2
    assert "bogus" in capsys.readouterr().err
    assert mome(["bench", "--run-config", "no-such-key=1", "--out", str(tmp_path)]) == 2
    assert not any(tmp_path.iterdir())


def test_adapt_personalises_only_the_gate_and_saves_before_scoring(bench_run, tmp_path, capsys):
    """`mome adapt`: a hospital that took no part fits the distributed mixture to its few labelled cases."""
    from mome.common.bundle import load_bundle

    _, out, _ = bench_run
    given = out / "mixed" / "seed-0" / "mome" / "model"
    late = next((out / "mixed" / "seed-0" / "late").iterdir())
    (late / "labelsTs" / sorted(p.name for p in (late / "labelsTs").iterdir())[0]).unlink()  # one case unlabelled
    assert mome(["adapt", "--model", str(given), "--site", str(late), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "adapted on 5 labelled case(s)" in printed and "held-out Dice" in printed and "segmented 1" in printed
    before, after = load_bundle(given), load_bundle(tmp_path / "model")
    assert after.site_id == late.name and list(after.experts) == list(before.experts)
    assert all(np.array_equal(after.experts[e][k], before.experts[e][k]) for e in before.experts
               for k in before.experts[e])
    assert any(not np.array_equal(after.gate[k], before.gate[k]) for k in before.gate)
    assert len(list((tmp_path / "predictions").glob("*.nii.gz"))) == 1
    assert mome(["adapt", "--model", str(tmp_path / "nowhere"), "--site", str(late), "--out", str(tmp_path)]) == 2
