"""A misbehaving site against the coordinator, on Flower's simulation engine: a scripted client mod turns one site
into an adversary (stolen identity, inflated or negative counts, NaN or huge losses, a poisoned gate, malformed
records, an array header declaring terabytes, every site gone). Each run must finish or stop with the quorum
error, leave the honest sites' models as they would be without the adversary, and name every rejection."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from mome.common.wire import PACKED_DATA, Key, pack, unpack
from mome.server.checkpoint import load_checkpoint
from mome.sim.run_sim import simulate
from tests.conftest import TINY_RUN

HUGE = (10**6, 10**6)  # 4 TB of float32 if anyone believed the header


def huge_header_array() -> Array:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": HUGE})
    return Array(dtype="float32", shape=HUGE, stype="numpy.ndarray", data=buffer.getvalue() + bytes(64))


def _with(reply: Message, msg: Message, **records) -> Message:
    """The reply with some records replaced (None removes one)."""
    content = RecordDict({k: v for k, v in reply.content.items() if k not in records})
    for name, record in records.items():
        if record is not None:
            content[name] = record
    return Message(content, reply_to=msg)


def _metrics(reply: Message, **changes) -> MetricRecord:
    return MetricRecord({**dict(reply.content[Key.METRICS]), **changes})


def _scaled_model(reply: Message, factor: float) -> ArrayRecord:
    return pack({k: (v * factor).astype(v.dtype) for k, v in unpack(reply.content[Key.MODEL]).items()})


def _huge_first_array(reply: Message) -> ArrayRecord:
    record = reply.content[Key.MODEL]
    return ArrayRecord({**dict(record.items()), PACKED_DATA: huge_header_array()})


ATTACKS = {
    "huge-array": lambda msg, reply: _with(reply, msg, **{Key.MODEL: _huge_first_array(reply)}),
    "no-site-record": lambda msg, reply: _with(reply, msg, site=None),
    "steal-site-a": lambda msg, reply: _with(reply, msg, site=ConfigRecord({"site-id": "site-a"})),
    "poison-x10": lambda msg, reply: _with(reply, msg, **{Key.MODEL: _scaled_model(reply, 10.0)}),
    "nan-loss": lambda msg, reply: _with(reply, msg, **{Key.METRICS: _metrics(reply, train_loss=math.nan)}),
    "huge-loss": lambda msg, reply: _with(reply, msg, **{Key.METRICS: _metrics(reply, train_loss=1e9)}),
    "inflate-reply": lambda msg, reply: _with(reply, msg, **{Key.METRICS: _metrics(reply, **{"num-examples": 10**12})}),
    "inflate-declared": lambda msg, reply: _with(reply, msg, **{Key.METRICS: _metrics(
        reply, n_train=10**12, n_val=10**12, n_gate=10**12)}),
    "negative-declared": lambda msg, reply: _with(reply, msg, **{Key.METRICS: _metrics(reply, n_train=-5)}),
}


def adversary(site: str, script: dict[str, list[str]]):
    """A client mod: at `site`, apply the attacks scripted for a message ('describe' or the step number)."""

    def mod(msg: Message, context, call_next) -> Message:
        reply = call_next(msg, context)
        if reply.has_error() or str(reply.content["site"]["site-id"]) != site:
            return reply
        kind = msg.metadata.message_type
        attacks = script.get("describe" if kind == "query.describe" else msg.metadata.group_id, [])
        if kind.startswith("train"):
            attacks = attacks + script.get("every-train", [])
        for attack in attacks:
            reply = ATTACKS[attack](msg, reply)
        return reply

    return mod


def everyone_fails_from(step: str):
    def mod(msg: Message, context, call_next) -> Message:
        if msg.metadata.group_id == step:
            raise RuntimeError("site gone")
        return call_next(msg, context)

    return mod


# steps: warmup 0, 1; expert 2; gate 3, 4; evaluate 5. The plan is fixed: a site's honest geometry shapes the
# planned one, so without this "site-a alone" would train on another grid than site-a beside site-b
ADV_CFG = TINY_RUN.replace(warmup_rounds=2, gate_rounds=2, target_spacing="1,1,1", patch_size="24,24,24")


@pytest.fixture(scope="module")
def honest_alone(two_sites, tmp_path_factory):
    """site-a on its own: what an adversary whose every update is rejected must leave the federation at."""
    run = tmp_path_factory.mktemp("alone")
    simulate("mome", two_sites[:1], ADV_CFG, run)
    return load_checkpoint(run / "mome" / "checkpoints" / "step_006.npz")


@pytest.fixture(scope="module")
def attacked(two_sites, tmp_path_factory):
    """site-b attacks at every training step; each attack must be rejected."""
    run = tmp_path_factory.mktemp("attacked")
    script = {"0": ["huge-array"], "1": ["no-site-record"], "2": ["steal-site-a"], "3": ["poison-x10"],
              "4": ["nan-loss"]}
    metrics = simulate("mome", two_sites, ADV_CFG, run, mods=[adversary("site-b", script)])
    return metrics, load_checkpoint(run / "mome" / "checkpoints" / "step_006.npz")


def _dropped(metrics: dict, step: int) -> list[str]:
    return [d["reason"] for d in metrics["dropped"] if d["step"] == step]


@pytest.mark.parametrize("step, reason", [
    (0, "declared shape (1000000, 1000000)"),  # refused from the header: nothing of 4 TB was allocated
    (1, "no 'site' record"),
    (2, "claims site id 'site-a', but its node is bound to site-b"),
    (3, "above max-update-ratio"),  # a gate scaled x10: finite, and far inside the old absolute bound 1e4
    (4, "train_loss is not a finite number"),
])
def test_each_attack_is_rejected_with_its_reason(attacked, step, reason):
    metrics, _ = attacked
    assert metrics["status"] == "ok"
    reasons = _dropped(metrics, step)
    assert len(reasons) == 1 and reason in reasons[0], reasons
    assert "site-b" not in metrics["rounds"][step]["sites"], "a rejected reply must not count in the step"


def test_rejected_adversary_leaves_the_honest_site_as_without_it(attacked, honest_alone):
    _, final = attacked
    assert sorted(final.experts) == ["site-a"], "a stolen identity must not store or replace an expert"
    for mine, theirs in ((final.base, honest_alone.base), (final.gate, honest_alone.gate)):
        assert all(np.array_equal(mine[k], theirs[k]) for k in mine)
    a, alone = final.experts["site-a"], honest_alone.experts["site-a"]
    assert all(np.array_equal(a[k], alone[k]) for k in a)


def test_bindings_are_recorded(attacked):
    metrics, _ = attacked
    assert set(metrics["bindings"]) == {"site-a", "site-b"}
    assert {e["site"] for e in metrics["identity"] if e["event"] == "bound"} == {"site-a", "site-b"}


@pytest.fixture(scope="module")
def weighed(tiny_federation, tmp_path_factory):
    """site-c declares 10^12 cases and reports a huge, then a NaN DRO loss; site-d declares a negative count."""
    run = tmp_path_factory.mktemp("weighed")
    cfg = TINY_RUN.replace(gate_aggregation="dro", max_site_weight=0.4)  # warmup 0, expert 1, gate 2, 3, eval 4
    mods = [adversary("site-c", {"describe": ["inflate-declared"], "every-train": ["inflate-reply"],
                                 "2": ["huge-loss"], "3": ["nan-loss"]}),
            adversary("site-d", {"describe": ["negative-declared"]})]
    return simulate("mome", tiny_federation, cfg, run, mods=mods)


def test_inflated_counts_and_losses_cannot_take_over_the_average(weighed):
    assert weighed["status"] == "ok"
    capped = [e for e in weighed["identity"] if e["event"] == "counts capped"]
    assert [e["site"] for e in capped] == ["site-c"]
    aggregations = [r for r in weighed["rounds"] if "weights" in r]
    # the expert round is also the federation's last FedAvg round: its average is capped like the others
    assert [r["phase"] for r in aggregations] == ["warmup", "expert", "gate", "gate"]
    for r in aggregations:
        assert math.isclose(sum(r["weights"].values()), 1.0)
        # uncapped, 10^5 declared cases (or exp(10) on the loss) would give site-c nearly the whole average
        assert r["weights"].get("site-c", 0.0) <= 0.4 + 1e-9, r["weights"]
    assert "site-c" in aggregations[2]["weights"], "a huge but finite loss is clipped, not a reason to drop"
    assert "site-c" not in aggregations[3]["weights"] and any(
        "train_loss is not a finite number" in r for r in _dropped(weighed, 3))


def test_negative_declared_count_refuses_the_site(weighed):
    refused = [e for e in weighed["identity"] if e["event"] == "refused"]
    assert len(refused) == 1 and "n_train -5 is not a non-negative integer" in refused[0]["reason"]
    assert "site-d" not in weighed["bindings"]
    assert all("site-d" not in r["sites"] for r in weighed["rounds"]), "a refused site is sent no work"


def test_all_sites_gone_stops_the_run_with_the_quorum_error(two_sites, tmp_path):
    metrics = simulate("mome", two_sites, TINY_RUN, tmp_path, mods=[everyone_fails_from("1")])
    assert metrics["status"] == "failed" and "fewer than min-sites 1" in metrics["error"], metrics.get("error")
    assert len(_dropped(metrics, 1)) == 4, "both sites, in the step and its one retry"
    assert not (tmp_path / "mome" / "model").exists(), "no model is published from a run that stopped"
