"""The federation on Flower's real simulation engine: protocol, what sites send, bad updates, resume, predict."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from flwr.app import Message

from mome.common.wire import SHARED_EXPERT, Key, Status, unpack
from mome.server.checkpoint import ServerState, load_checkpoint
from mome.server.schedule import schedule
from mome.server.report import write_report
from mome.sim.run_sim import simulate
from mome.sim.synth import site_traits
from tests.conftest import TINY_OVERRIDES, TINY_RUN

ALLOWED_RECORDS = {Key.METRICS, Key.MODEL, Key.OUTCOME, "site"}


def record_replies(log_path: str):
    """A client mod writing the structure of every reply (record names, array names, metric types) to a file."""

    def mod(msg: Message, context, call_next) -> Message:
        reply = call_next(msg, context)
        entry = {"type": msg.metadata.message_type,
                 "records": {name: type(rec).__name__ for name, rec in reply.content.items()},
                 "arrays": sorted(a for rec in reply.content.array_records.values() for a in unpack(rec)),
                 "sent_arrays": {n: sorted(unpack(r)) for n, r in msg.content.array_records.items()},
                 "metrics": {k: type(v).__name__ for rec in reply.content.metric_records.values()
                             for k, v in rec.items()},
                 "configs": {k: str(v) for rec in reply.content.config_records.values() for k, v in rec.items()}}
        with open(log_path, "a") as fh:
            fh.write(json.dumps(entry) + "\n")
        return reply

    return mod


@pytest.fixture(scope="module")
def mome_run(two_sites, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    log_path = run_dir / "replies.jsonl"
    metrics = simulate("mome", two_sites, TINY_RUN, run_dir, mods=[record_replies(str(log_path))])
    return run_dir, metrics, [json.loads(line) for line in log_path.read_text().splitlines()]


def test_metrics_json_has_every_key(mome_run, two_sites):
    run_dir, metrics, _ = mome_run
    on_disk = json.loads((run_dir / "mome" / "metrics.json").read_text())
    assert on_disk["strategy"] == "mome" and set(on_disk["sites"]) == {d.name for d in two_sites}
    for site, entry in on_disk["sites"].items():
        for key in ("dice", "dice_mean", "hd95", "n_train", "n_val", "n_test", "bytes_up", "bytes_down",
                    "shapley", "gate_weights"):
            assert key in entry, (site, key)
        assert len(entry["dice"]) == len(on_disk["regions"]) == 3
        assert 0.0 <= entry["dice_mean"] <= 1.0 and entry["bytes_up"] > 0 and entry["bytes_down"] > 0
        assert set(entry["variants"]) == {"expert", "mixture_global"}
    assert {"dice_mean", "worst_site", "worst_dice"} <= set(on_disk["summary"])
    assert [r["phase"] for r in on_disk["rounds"]] == ["warmup", "expert", "gate", "gate", "evaluate"]
    assert on_disk["wall_time_s"] > 0
    assert (run_dir / "mome" / "model" / "metadata.json").exists()
    for site in on_disk["sites"]:  # each site keeps the mixture with its personalised gate
        assert json.loads((run_dir / "mome" / "sites" / site / "model" / "metadata.json").read_text())["has_gate"]


def test_report_shows_tables_plots_and_how_each_site_differs(mome_run, two_sites):
    run_dir, metrics, _ = mome_run
    report = write_report(run_dir, {"mome": metrics}, {d.name: site_traits(d) for d in two_sites})
    text = report.read_text()
    assert "how the site is made" in text and "| site-b | risk-margin 3 vox, 4 training cases" in text, text
    for png in ("dice_per_site.png", "curves_mome.png", "gate_weights_mome.png", "shapley_mome.png"):
        assert f"]({png})" in text and (run_dir / png).stat().st_size > 1000, png


def test_the_report_shows_one_held_out_case_per_site_segmented(mome_run, two_sites):
    from mome.sim.preview import site_overlays

    run_dir, metrics, _ = mome_run
    pictures = site_overlays(run_dir, "mome", two_sites)
    labelled = {d.name for d in two_sites if any((d / "labelsTs").glob("*.nii.gz"))}
    assert labelled and set(pictures) == labelled
    text = write_report(run_dir, {"mome": metrics}, overlays=pictures).read_text()
    for png in pictures.values():
        assert png.read_bytes()[:4] == b"\x89PNG" and f"]({png.relative_to(run_dir)})" in text


def test_status_says_where_a_run_stands_from_its_checkpoints(mome_run, tmp_path, capsys):
    import shutil

    from mome.cli.main import main as mome

    run_dir, metrics, _ = mome_run
    steps = [f"{phase} round {rnd + 1}" for phase, rnd in schedule(TINY_RUN)]
    assert mome(["status", str(run_dir)]) == 0  # the folder above the strategy's, holding one run
    out = capsys.readouterr().out
    assert "ended: ok" in out and f"steps finished: {len(steps)} of {len(steps)}; last: {steps[-1]}" in out, out
    assert f"sites bound ({len(metrics['sites'])}): site-a (node" in out
    midway = tmp_path / "mome" / "checkpoints"  # as a run still going after its second step leaves it
    shutil.copytree(run_dir / "mome" / "checkpoints", midway)
    (midway / "latest").write_text("step_002.npz")
    assert mome(["status", str(midway.parent)]) == 0
    out = capsys.readouterr().out
    assert f"steps finished: 2 of {len(steps)}; last: {steps[1]}" in out and f"now: {steps[2]}" in out, out
    assert "ended" not in out and "replied in the last step: site-a, site-b" in out
    shutil.copy2(run_dir / "mome" / "metrics.json", midway.parent)  # an earlier attempt's, then a restart:
    (midway.parent / "config.json").write_text((run_dir / "mome" / "config.json").read_text())
    assert mome(["status", str(midway.parent)]) == 0 and "ended" not in capsys.readouterr().out
    starting = tmp_path / "starting" / "mome"  # the run has begun (config.json) but finished no step
    starting.mkdir(parents=True)
    shutil.copy(run_dir / "mome" / "config.json", starting)
    assert mome(["status", str(starting.parent)]) == 0 and "no step finished yet" in capsys.readouterr().out
    assert mome(["status", str(tmp_path / "nothing")]) == 2
    assert "no run here" in capsys.readouterr().err


def test_gate_learns_on_validation_cases_only(mome_run):
    """The experts were fitted to the training split: a gate trained there would over-trust each site's own."""
    run_dir, _, _ = mome_run
    rounds = json.loads((run_dir / "mome" / "metrics.json").read_text())["rounds"]
    gate_sites = [s for r in rounds if r["phase"] == "gate" for s in r["sites"].values()]
    assert gate_sites and all(s["n_gate"] == s["n_val"] > 0 for s in gate_sites), gate_sites


@pytest.mark.parametrize("warmup_rounds, warmup_epochs, expert_epochs", [(1, 1, 1), (8, 4, 8), (2, 3, 5), (0, 2, 3)])
def test_fedavg_gets_at_least_the_local_epochs_of_mome(warmup_rounds, warmup_epochs, expert_epochs):
    cfg = TINY_RUN.replace(warmup_rounds=warmup_rounds, warmup_epochs=warmup_epochs, expert_epochs=expert_epochs)
    mome_epochs = sum(warmup_epochs if p == "warmup" else expert_epochs
                      for p, _ in schedule(cfg) if p in ("warmup", "expert"))
    fedavg_epochs = warmup_epochs * sum(p == "shared" for p, _ in schedule(cfg.replace(strategy="fedavg")))
    assert mome_epochs <= fedavg_epochs < mome_epochs + warmup_epochs


def _checkpoint(run_dir: Path, step: int) -> ServerState:
    return load_checkpoint(run_dir / "mome" / "checkpoints" / f"step_{step:03d}.npz")


def test_server_holds_one_distinct_expert_per_site_and_the_gate_moves(mome_run, two_sites):
    run_dir, _, _ = mome_run
    final = _checkpoint(run_dir, 5)
    assert sorted(final.experts) == sorted(d.name for d in two_sites)
    a, b = (final.experts[d.name] for d in two_sites)
    assert any(not np.array_equal(a[k], b[k]) for k in a), "experts must not be averaged together"
    gate_1, gate_2 = _checkpoint(run_dir, 3).gate, _checkpoint(run_dir, 4).gate
    assert any(not np.allclose(gate_1[k], gate_2[k]) for k in gate_1 if gate_1[k].dtype.kind == "f")


def test_sites_send_only_named_weights_and_scalars(mome_run):
    _, _, replies = mome_run
    assert {r["type"] for r in replies} >= {"query.describe", "train.shared", "train.expert", "train.gate", "evaluate"}
    for r in replies:
        assert set(r["records"]) <= ALLOWED_RECORDS, r["records"]
        assert set(r["metrics"].values()) <= {"int", "float", "list"}
        # labels: the dataset.json label spec; status/reason: how the final step ended
        assert set(r["configs"]) <= {"site-id", "labels", "modalities", "status", "reason", "segmentation"}
        if r["type"].startswith("train."):
            sent = r["sent_arrays"][Key.GATE if r["type"] == "train.gate" else Key.MODEL]
            assert r["arrays"] == sent, "a site returns exactly the arrays it was sent, nothing else"
        else:
            assert r["arrays"] == []
        if "status" in r["configs"]:  # the final step's outcome: a fixed code, never free text from the site
            assert r["configs"]["status"] in set(Status), r["configs"]
        no_case_ids = json.dumps(r)
        assert "_00" not in no_case_ids, "no case identifier may leave a site"


@pytest.mark.slow
def test_same_seed_same_models(tiny_federation, tmp_path):
    """Four sites (a float sum of two terms does not depend on their order; of four it does): two runs of the
    same config end with bit-identical experts and gate, whatever order the sites' replies arrived in."""
    cfg = TINY_RUN.replace(gate_rounds=1)
    finals = []
    for run in ("one", "two"):
        simulate("mome", tiny_federation, cfg, tmp_path / run)
        finals.append(load_checkpoint(tmp_path / run / "mome" / "checkpoints" / "step_004.npz"))
    one, two = finals
    assert sorted(one.experts) == sorted(two.experts) == sorted(d.name for d in tiny_federation)
    for site in one.experts:
        assert all(np.array_equal(one.experts[site][k], two.experts[site][k]) for k in one.experts[site])
    assert all(np.array_equal(one.gate[k], two.gate[k]) for k in one.gate)
    assert all(np.array_equal(one.base[k], two.base[k]) for k in one.base)


@pytest.mark.slow
def test_killed_run_resumes_from_checkpoint(two_sites, tmp_path):
    data = two_sites[0].parent
    cmd = [sys.executable, "-m", "mome.cli.main", "sim", "--data", str(data), "--out", str(tmp_path),
           "--run-config", TINY_OVERRIDES]
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env=env)
    target = tmp_path / "mome" / "checkpoints" / "step_002.npz"
    deadline = time.monotonic() + 240
    while not target.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert target.exists(), "the first run never checkpointed step 2"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "mome" / "metrics.json").exists()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming mome from checkpoint after step" in done.stderr
    metrics = json.loads((tmp_path / "mome" / "metrics.json").read_text())
    assert [r["phase"] for r in metrics["rounds"]] == ["warmup", "expert", "gate", "gate", "evaluate"]
    assert set(metrics["sites"]) == {d.name for d in two_sites}


def test_predict_matches_input_geometry(mome_run, two_sites, tmp_path):
    from mome.cli.main import main as mome

    run_dir, _, _ = mome_run
    site = two_sites[1]
    assert mome(["predict", "--model", str(run_dir / "mome" / "sites" / site.name / "model"),
                 "--input", str(site), "--out", str(tmp_path), "--overlay"]) == 0
    labels = json.loads((site / "dataset.json").read_text())["labels"]
    allowed = {v for x in labels.values() for v in (x if isinstance(x, list) else [x])}
    for image in sorted((site / "imagesTs").glob("*_0000.nii.gz")):
        case = image.name[: -len("_0000.nii.gz")]
        ref, out = nib.load(str(image)), nib.load(str(tmp_path / f"{case}.nii.gz"))
        assert out.shape == ref.shape and np.allclose(out.affine, ref.affine)
        assert set(np.unique(np.asarray(out.dataobj)).tolist()) <= allowed
        assert (tmp_path / f"{case}.nii.gz").stat().st_mode & 0o777 == 0o644  # the clinical viewer's user reads it
        assert (tmp_path / f"{case}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_predict_reads_only_the_files_given_and_says_which_sequences_a_case_lacks(mome_run, two_sites, tmp_path,
                                                                                    capsys):
    import shutil

    from mome.cli.main import main as mome

    run_dir, _, _ = mome_run
    site = two_sites[1]
    bundle = str(run_dir / "mome" / "sites" / site.name / "model")
    case = sorted((site / "imagesTs").glob("*_0000.nii.gz"))[0].name[: -len("_0000.nii.gz")]
    given = [site / "imagesTs" / f"{case}_{c:04d}.nii.gz" for c in (0, 1)]  # T1 and T1ce; T2 and FLAIR lie beside
    alone = tmp_path / "alone"
    alone.mkdir()
    for path in given:
        shutil.copy(path, alone / path.name)
    assert mome(["predict", "--model", bundle, "--input", *map(str, given), "--out", str(tmp_path / "a")]) == 1
    assert f"{case}: lacks T2, FLAIR (loose files' channels: 0000 = T1" in capsys.readouterr().err
    assert not (tmp_path / "a" / f"{case}.nii.gz").exists(), "a case lacking sequences is skipped unless allowed"
    assert mome(["predict", "--model", bundle, "--input", *map(str, given), "--out", str(tmp_path / "a"),
                 "--allow-missing"]) == 0
    assert f"note: {case}: segmented without T2, FLAIR (loose files' channels: 0000 = T1" in capsys.readouterr().out
    assert mome(["predict", "--model", bundle, "--input", str(alone), "--out", str(tmp_path / "b"),
                 "--allow-missing"]) == 0
    first, second = (np.asarray(nib.load(str(tmp_path / d / f"{case}.nii.gz")).dataobj) for d in ("a", "b"))
    assert np.array_equal(first, second), "the sibling files that were not given were read"


def _resumable_copy(run_dir: Path, target: Path, keep_steps: int) -> Path:
    """The run folder as a crash after step `keep_steps` would leave it, with a torn newer checkpoint on top that
    `latest` points at (load_latest must fall back past it)."""
    import shutil

    shutil.copytree(run_dir / "mome", target / "mome")
    ckpt = target / "mome" / "checkpoints"
    for path in ckpt.glob("step_*.npz"):
        if int(path.stem.split("_")[1]) > keep_steps:
            path.unlink()
    torn = ckpt / f"step_{keep_steps + 1:03d}.npz"
    torn.write_bytes((run_dir / "mome" / "checkpoints" / torn.name).read_bytes()[:1000])
    (ckpt / "latest").write_text(torn.name)
    for name in ("metrics.json", "model"):
        path = target / "mome" / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return target


def test_resume_with_the_same_config_ends_with_the_same_weights(mome_run, two_sites, tmp_path):
    run_dir, _, _ = mome_run
    resumed = _resumable_copy(run_dir, tmp_path, keep_steps=2)
    metrics = simulate("mome", two_sites, TINY_RUN, resumed)
    assert metrics["status"] == "ok" and [r["step"] for r in metrics["rounds"]] == [0, 1, 2, 3, 4]
    before = json.loads((run_dir / "mome" / "metrics.json").read_text())["rounds"]
    assert metrics["rounds"][:2] == before[:2], "steps 1-2 come from the checkpoint, not from a rerun"
    one, two = _checkpoint(run_dir, 5), _checkpoint(resumed, 5)
    for mine, theirs in ((one.base, two.base), (one.gate, two.gate)):
        assert all(np.array_equal(mine[k], theirs[k]) for k in mine)
    for site in one.experts:
        assert all(np.array_equal(one.experts[site][k], two.experts[site][k]) for k in one.experts[site])


def test_resume_with_another_config_is_refused_naming_the_keys(mome_run, two_sites, tmp_path):
    run_dir, _, _ = mome_run
    resumed = _resumable_copy(run_dir, tmp_path, keep_steps=2)
    metrics = simulate("mome", two_sites, TINY_RUN.replace(lr=0.01, gate_steps=3), resumed)
    assert metrics["status"] == "failed"
    assert "lr (0.003 -> 0.01)" in metrics["error"] and "gate-steps (2 -> 3)" in metrics["error"], metrics["error"]
    assert "--force-resume" in metrics["error"]
    assert (resumed / "mome" / "checkpoints" / "step_003.npz").stat().st_size == 1000, \
        "the refused run must not write over the checkpoints"


def test_fedbn_keeps_each_sites_normalisation_at_the_site(two_sites, tmp_path):
    """FedBN: the shared body is averaged, the normalisation layers are the site's own and never leave it."""
    from mome.common.bundle import load_bundle
    from mome.common.model import ExpertNet, norm_keys

    metrics = simulate("fedbn", two_sites, TINY_RUN, tmp_path)
    assert metrics["status"] == "ok"
    keys = norm_keys(ExpertNet.from_config(TINY_RUN, 5, 3))
    assert keys and all(".weight" in k or ".bias" in k for k in keys)
    final = load_checkpoint(sorted((tmp_path / "fedbn" / "checkpoints").glob("step_*.npz"))[-1])
    for k in keys:  # every upload carried the normalisation exactly as sent: the federation's never moved
        assert np.all(final.base[k] == (1.0 if k.endswith("weight") else 0.0)), k
    bundles = [load_bundle(tmp_path / "fedbn" / "sites" / d.name / "model").experts["shared"] for d in two_sites]
    assert all(np.array_equal(bundles[0][k], bundles[1][k]) == (k not in keys) for k in bundles[0])
    assert all(np.array_equal(bundles[0][k], final.base[k]) for k in bundles[0] if k not in keys)


def test_fedsm_routes_every_case_to_one_expert(two_sites, tmp_path):
    """FedSM: MoME's experts, a selector trained to tell the sites apart (cross-entropy on the site's own expert),
    and hard top-1 routing in every bundle."""
    from mome.common.bundle import load_bundle

    metrics = simulate("fedsm", two_sites, TINY_RUN.replace(gate_steps=10), tmp_path)
    assert metrics["status"] == "ok"
    gate_rounds = [r for r in metrics["rounds"] if r["phase"] == "gate"]
    assert len(gate_rounds) == TINY_RUN.gate_rounds and all(r["sites"] for r in gate_rounds)
    for site, entry in metrics["sites"].items():
        weights = np.asarray(entry["gate_weights"]) * entry["n_test"]  # a mean of one-hot rows: whole cases
        assert np.allclose(weights, np.round(weights), atol=1e-4) and weights.sum() == pytest.approx(entry["n_test"])
        bundle = load_bundle(tmp_path / "fedsm" / "sites" / site / "model")
        assert bundle.cfg.gate_top_k == 1 and bundle.strategy == "fedsm" and bundle.gate is not None
    assert load_bundle(tmp_path / "fedsm" / "model").cfg.gate_top_k == 1


def test_a_validated_final_mixture_is_the_one_saved_and_scored(two_sites, tmp_path):
    """final-mixture=validated: each site keeps the candidate its validation cases chose; "mixture" is that one."""
    from mome.client.choice import CANDIDATES
    from mome.common.bundle import load_bundle

    metrics = simulate("mome", two_sites, TINY_RUN.replace(final_mixture="validated"), tmp_path)
    assert metrics["status"] == "ok"
    for site, entry in metrics["sites"].items():
        choice = CANDIDATES[int(entry.get("final_choice", 0))]
        bundle = load_bundle(tmp_path / "mome" / "sites" / site / "model")
        assert (bundle.gate is None) == (choice == "expert")
        variants = entry["variants"]
        assert ("mixture_personal" in variants) == (choice != "personal")
        if choice != "personal":
            kept = variants["mixture_global" if choice == "global" else "expert"]
            assert entry["dice_mean"] == kept["dice_mean"]


def test_a_refreshed_own_expert_is_the_shared_model_fine_tuned_at_the_site(two_sites, tmp_path):
    """refresh-own-expert (with experts-update-shared): a site's final mixture holds, in its own slot, the
    federation's final shared model fine-tuned on its cases (fedavg-ft's step), not the expert it sent; the
    other experts and the shared model are the federation's."""
    from mome.common.bundle import load_bundle

    cfg = TINY_RUN.replace(refresh_own_expert=True, experts_update_shared=True)
    metrics = simulate("mome", two_sites, cfg, tmp_path)
    assert metrics["status"] == "ok"
    final = load_checkpoint(sorted((tmp_path / "mome" / "checkpoints").glob("step_*.npz"))[-1])
    for site in metrics["sites"]:
        kept = load_bundle(tmp_path / "mome" / "sites" / site / "model").experts
        assert set(kept) == {*final.experts, SHARED_EXPERT}
        assert all(np.array_equal(kept[SHARED_EXPERT][k], final.base[k]) for k in final.base)
        other = next(s for s in final.experts if s != site)
        assert all(np.array_equal(kept[other][k], final.experts[other][k]) for k in final.base)
        assert any(not np.array_equal(kept[site][k], final.base[k]) for k in final.base)  # fine-tuned...
        assert any(not np.array_equal(kept[site][k], final.experts[site][k]) for k in final.base)  # ...not sent
