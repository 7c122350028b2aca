"""What leaves a site, checked on Flower's simulation engine: every reply of every action against the declared
schema key by key, an undeclared metric withheld, nothing computed from fewer than min-cases cases, the site's
policy refusing a request by name and staying up, the audit log matching what the coordinator received, and
differential privacy clipping each upload before noise with its epsilon reported."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message

from mome.client.audit import AUDIT_FILE, read, summary
from mome.client.policy import SitePolicy
from mome.common.config import config_from_mapping
from mome.common.labels import label_spec_from_dataset_json
from mome.common.schema import ERROR_REASON, Sizes, expert_count, violations
from mome.common.wire import Key, array_digests, reply_digest
from mome.sim.run_sim import simulate
from tests.conftest import TINY_RUN


def schema_recorder(log_path: Path, site_dirs: list[Path]):
    """A client mod (outside the site's guard, so it sees exactly what leaves) checking each reply against the
    schema in the site's own process, and writing what it found."""
    regions = {d.name: len(label_spec_from_dataset_json(json.loads((d / "dataset.json").read_text())).metric_names)
               for d in site_dirs}

    def mod(msg: Message, context, call_next) -> Message:
        reply = call_next(msg, context)
        entry = {"type": msg.metadata.message_type, "step": msg.metadata.group_id}
        if reply.has_error():
            entry["error"] = reply.error.reason
        else:
            site = str(reply.content["site"]["site-id"])
            cfg = config_from_mapping(dict(msg.content[Key.CONFIG]))
            sizes = Sizes(len(cfg.modality_names), regions[site], expert_count(msg.content))
            entry.update(site=site, violations=violations(entry["type"], reply.content, msg.content, sizes),
                         metrics={k: v for r in reply.content.metric_records.values() for k, v in r.items()},
                         configs={k: str(v) for r in reply.content.config_records.values() for k, v in r.items()},
                         digest=reply_digest(array_digests(reply.content)))
        with open(log_path, "a") as fh:
            fh.write(json.dumps(entry) + "\n")
        return reply

    return mod


def add_undeclared_metric_at_second_site():
    """A ClientApp change that adds a metric (at the second site's final step): the guard must withhold it."""

    def mod(msg: Message, context, call_next) -> Message:
        import mome.client.site as code  # patched in the site's own (Ray worker) process

        if msg.metadata.message_type != "evaluate" or str(context.node_config["partition-id"]) != "1":
            return call_next(msg, context)
        original = code._flatten
        code._flatten = lambda results: {**original(results), "first_case_age": 61.0}
        try:
            return call_next(msg, context)
        finally:
            code._flatten = original

    return mod


@pytest.fixture(scope="module")
def five_case_sites(tmp_path_factory) -> list[Path]:
    """Two sites of 5 training cases (4 train + 1 validation) and 2 held-out cases each."""
    from mome.sim.synth import generate_federation

    return generate_federation(tmp_path_factory.mktemp("five"), sites=2, preset="iid", seed=3, size=24,
                               cases=5, test_cases=2)


RELEASE_CFG = TINY_RUN.replace(min_cases=3, expert_epochs=2, dp_clip=0.5, dp_noise_multiplier=0.8)


@pytest.fixture(scope="module")
def mome_release(five_case_sites, tmp_path_factory):
    run = tmp_path_factory.mktemp("release")
    log = run / "replies.jsonl"
    metrics = simulate("mome", five_case_sites, RELEASE_CFG, run, mods=[schema_recorder(log, five_case_sites)],
                       policies={"site-b": SitePolicy(max_epochs=1)})
    return run, metrics, [json.loads(line) for line in log.read_text().splitlines()]


@pytest.fixture(scope="module")
def fedavg_release(two_sites, tmp_path_factory):
    run = tmp_path_factory.mktemp("release-fedavg")
    log = run / "replies.jsonl"
    metrics = simulate("fedavg-ft", two_sites, TINY_RUN, run,
                       mods=[schema_recorder(log, two_sites), add_undeclared_metric_at_second_site()])
    return run, metrics, [json.loads(line) for line in log.read_text().splitlines()]


def test_every_reply_of_every_action_is_inside_the_schema(mome_release, fedavg_release):
    for _, _, replies in (mome_release, fedavg_release):
        for r in replies:
            if "error" in r:
                assert ERROR_REASON.fullmatch(r["error"]), r  # a code and a short reason, no site text
            else:
                assert r["violations"] == [], r
    seen = {r["type"] for _, _, replies in (mome_release, fedavg_release) for r in replies if "error" not in r}
    assert seen == {"query.describe", "train.shared", "train.expert", "train.gate", "evaluate"}
    # the only errors are the two these runs provoke: an undeclared metric anywhere else fails here
    errors = [r["error"].split(":")[0] for _, _, replies in (mome_release, fedavg_release) for r in replies
              if "error" in r]
    assert sorted(errors) == ["payload", "policy"], errors


def test_describe_carries_only_counts_and_the_sites_aggregate_geometry(mome_release, five_case_sites):
    """The plan's inputs: medians over a site's cases of spacing, head extent and per-channel head intensity
    percentiles, named in the schema; no per-case value, and the plan the run used is built from them."""
    from mome.common.cases import load_site
    from mome.common.schema import DESCRIBE, GEOMETRY

    run, metrics, replies = mome_release
    described = [r for r in replies if r["type"] == "query.describe"]
    assert len(described) == 2
    for reply in described:
        assert set(reply["metrics"]) == set(DESCRIBE) | set(GEOMETRY)
        assert set(reply["configs"]) == {"site-id", "labels", "modalities"}
        data = load_site(five_case_sites[0 if reply["configs"]["site-id"] == "site-a" else 1], RELEASE_CFG)
        cases = data.geometry
        assert len(cases) == 7
        expected = np.median([g["spacing"] for g in cases], axis=0)
        assert np.allclose(reply["metrics"]["spacing"], expected, atol=1e-3)
        assert np.allclose(reply["metrics"]["extent_mm"], np.median([g["extent"] for g in cases], axis=0), atol=1e-3)
        p50 = np.mean([g["intensity"][:, 1] for g in cases], axis=0)
        assert np.allclose(reply["metrics"]["intensity_p50"], p50, atol=1e-3)
    plan = json.loads((run / "mome" / "plan.json").read_text())
    assert plan["from_sites"] == ["site-a", "site-b"] and plan["target_spacing"] == [1.0, 1.0, 1.0]
    assert metrics["plan"] == plan


def test_a_metric_added_to_the_client_app_is_withheld(fedavg_release):
    run, metrics, replies = fedavg_release
    (withheld,) = [r for r in replies if r["type"] == "evaluate" and "error" in r]
    assert withheld["error"].startswith("payload: the reply was outside the declared schema")
    assert metrics["sites"]["site-b"]["status"] == "failed" and "payload" in metrics["sites"]["site-b"]["reason"]
    assert "first_case_age" not in json.dumps(metrics)
    assert metrics["sites"]["site-a"]["status"] == "evaluated"


def test_a_five_case_site_releases_nothing_computed_from_one_case(mome_release):
    run, metrics, replies = mome_release
    ok = [r for r in replies if "error" not in r]
    assert all(r["metrics"]["n_val"] == 1 for r in ok if r["type"] != "query.describe")
    assert not any("val_dice" in r["metrics"] for r in ok), "validation Dice of one case must stay at the site"
    gate = [r for r in ok if r["type"] == "train.gate"]
    assert gate and all(r["metrics"]["n_gate"] == 5 and r["metrics"]["gate_on_train"] == 1 for r in gate)
    final = [r for r in ok if r["type"] == "evaluate"]
    assert final and all(r["configs"]["status"] == "metrics-withheld" for r in final)
    assert not any(k.endswith(("dice", "dice_mean", "hd95")) or k in ("shapley", "gate_weights")
                   for r in final for k in r["metrics"])
    for site in ("site-a", "site-b"):
        local = run / "mome" / "sites" / site / "local_metrics.json"
        assert "mixture.dice_mean" in json.loads(local.read_text()), "the scores stay at the site, not nowhere"
    assert metrics["status"] == "ok" and metrics["summary"]["n_models_saved"] == 2


def test_a_request_beyond_the_site_policy_is_refused_by_name_and_the_site_stays_up(mome_release):
    _, metrics, replies = mome_release
    refusal = "policy: epochs 2 above this site's limit 1"
    assert [d["reason"] for d in metrics["dropped"]] == [f"site failed: {refusal}"]
    assert [r["error"] for r in replies if "error" in r] == [refusal]
    after = [r for r in replies if r.get("site") == "site-b" and r["type"] in ("train.gate", "evaluate")]
    assert len(after) == 3, "site-b answers the gate rounds and the final step after refusing"
    assert metrics["sites"]["site-b"]["model_saved"] == 1


def test_the_audit_log_lists_exactly_what_the_coordinator_received(mome_release):
    run, metrics, _ = mome_release
    received = {(str(r["step"]), site): entry.get("digest", "") for r in metrics["rounds"]
                for site, entry in r["sites"].items()}
    for site in ("site-a", "site-b"):
        entries = read(run / "mome" / "sites" / site / AUDIT_FILE)
        training = [e for e in entries if e["action"].startswith("train.") and "error" not in e]
        assert training and all(e["arrays"] for e in training)
        for e in training:
            assert e["digest"] == received[(e["step"], site)], (site, e["step"])
            assert e["digest"] == reply_digest({a["name"]: a["sha256"] for a in e["arrays"]})
        assert {e["action"] for e in entries} == {"query.describe", "train.shared", "train.expert", "train.gate",
                                                   "evaluate"}
    text = summary(run / "mome" / "sites" / "site-b" / AUDIT_FILE)
    assert "error replies: 1" in text and "policy: epochs 2" in text and "differential privacy: epsilon" in text


def test_dp_clips_every_upload_before_noise_and_reports_epsilon(mome_release):
    run, metrics, replies = mome_release
    for site in ("site-a", "site-b"):
        ledger = json.loads((run / "mome" / "sites" / site / "privacy.json").read_text())["uploads"]
        assert ledger and all(u["clipped_norm"] <= RELEASE_CFG.dp_clip * (1 + 1e-6) for u in ledger)
        entry = metrics["sites"][site]
        assert 0 < entry["dp_epsilon"] < float("inf") and entry["dp_delta"] == RELEASE_CFG.dp_delta
    uploads = [r for r in replies if r["type"].startswith("train.") and "error" not in r]
    assert all("dp_epsilon" in r["metrics"] for r in uploads)


def test_mome_audit_prints_a_summary_per_run(mome_release, capsys):
    from mome.cli.main import main as mome

    run, _, _ = mome_release
    assert mome(["audit", str(run / "mome" / "sites")]) == 0
    out = capsys.readouterr().out
    assert out.count("audit of ") == 2 and "metric keys sent:" in out and "val_dice" not in out
    assert "tensors sent: model: " in out and " tensors, " in out  # the tensors that left, not the packed arrays
    assert mome(["audit", str(run / "nothing-here")]) == 1
    assert mome(["audit", "--json", str(run / "mome" / "sites")]) == 0
    entries = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert entries and all({"log", "run_id", "action", "digest"} <= set(e) for e in entries if "error" not in e)
    assert any(name.startswith("mlp.") for e in entries for name, _, _ in e.get("tensors", {}).get("model", []))
