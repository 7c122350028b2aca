"""No reply can crash the coordinator: mutations of valid replies go through the code the ServerApp runs on them (reading
a reply, then assembling metrics.json and report.md from what was accepted); each is either used or rejected with a
reason (BadReply), nothing else."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from mome.common.config import Config
from mome.common.labels import LabelKind, LabelSpec
from mome.common.wire import PACKED_DATA, Key, Status, pack, unpack
from mome.server.protocol import Coordinator
from mome.server.replies import BadReply, description, parse_reply
from mome.server.report import write_report
from mome.server.results import final_sites, headline, site_entry, strategy_metrics
from tests.conftest import TINY_RUN
from tests.test_coordinator_units import labels, serverapp_identity  # noqa: F401  (fixtures)

MUTATIONS = 1200
LABELS = LabelSpec(LabelKind.REGIONS, ("whole_tumor", "tumor_core", "enhancing_tumor"), ((1, 2, 3), (2, 3), (3,)),
                   (0, 1, 2, 3), (1, 2, 3)).to_dict()
EVALUATED = {"num-examples": 12, "n_train": 13, "n_val": 3, "n_test": 12, "model_saved": 1, "dice": [0.8, 0.6, 0.5],
             "dice_mean": 0.63, "hd95": 6.5, "gate_weights": [0.5, 0.3, 0.2], "shapley": [0.1, 0.2, 0.1, 0.1, 0.0],
             "mixture_global.dice": [0.7, 0.6, 0.5], "mixture_global.dice_mean": 0.6}
LENGTHS = {"dice": 3, "gate_weights": 3, "shapley": 5, "modality_factors": 4}  # what the coordinator passes
ODD_VALUES = (math.nan, math.inf, -math.inf, -1, 10**18, 1e308, 0, [], [math.nan], [1.0] * 300, [0.5], [1, 2])


def _describe_content(labels) -> RecordDict:
    return RecordDict({"site": ConfigRecord({"site-id": "site-a", "labels": labels if isinstance(labels, str)
                                                                             else json.dumps(labels)}),
                       Key.METRICS: MetricRecord({"n_train": 4, "n_val": 1, "num-examples": 4})})


def _evaluate_content(metrics: dict, outcome: dict | None) -> RecordDict:
    content = RecordDict({"site": ConfigRecord({"site-id": "site-a"}), Key.METRICS: MetricRecord(metrics)})
    if outcome is not None:
        content[Key.OUTCOME] = ConfigRecord(outcome)
    return content


def _mutated_metrics(rng: random.Random) -> dict:
    metrics = dict(EVALUATED)
    for _ in range(rng.randint(1, 4)):
        key = rng.choice([*metrics, "extra", "mixture.dice", "expert.dice_mean", "train_loss"])
        if rng.random() < 0.2:
            metrics.pop(key, None)
        else:
            metrics[key] = rng.choice(ODD_VALUES)
    return metrics


def _mutated_labels(rng: random.Random):
    spec = json.loads(json.dumps(LABELS))
    choice = rng.randrange(9)
    if choice == 0:
        return rng.choice(["not json", "[]", "null", "1", "{", '"x"', "[" * 5000 + "]" * 5000])
    if choice == 1:
        spec["kind"] = rng.choice(["bogus", 3, None])
    elif choice == 2:
        spec["names"] = rng.choice([[], ["x"] * 100_000, [1, 2, 3], "abc", ["a" * 1000] * 3])
    elif choice == 3:
        spec["members"] = rng.choice([[[1]], [[-1], [2], [3]], [[], [2], [3]], [[1.5], [2], [3]], "x", [[300]] * 3])
    elif choice == 4:
        spec["values"] = rng.choice(["x", [None], [1e9], None])
    elif choice == 5:
        spec.pop(rng.choice(list(spec)))
    elif choice == 6:
        spec["regions_class_order"] = rng.choice([[1] * 10, ["a"], None])
    return spec  # choices 7, 8: valid


def _outcome(rng: random.Random) -> dict | None:
    return rng.choice([None, {"status": str(Status.EVALUATED), "reason": ""}, {"status": "bogus"},
                       {"status": str(Status.EVALUATED), "reason": "x" * 10_000}, {}])


def test_a_thousand_mutated_replies_are_used_or_rejected_with_a_reason(tmp_path):
    rng = random.Random(0)
    request = Message(RecordDict(), dst_node_id=1, message_type="evaluate")
    accepted, rejected, sites = 0, [], {}
    for i in range(MUTATIONS):
        try:
            if i % 3 == 0:
                site, spec, counts = description(Message(_describe_content(_mutated_labels(rng)), reply_to=request))
                LabelSpec.from_dict(spec)  # what the coordinator builds its models from
            else:
                content = _evaluate_content(_mutated_metrics(rng), _outcome(rng))
                if rng.random() < 0.1:
                    content[rng.choice(["extra", Key.MODEL])] = ArrayRecord()
                if rng.random() < 0.05:
                    content[Key.METRICS] = ConfigRecord({"dice_mean": "high"})
                reply = parse_reply(Message(content, reply_to=request), None, "site-a", LENGTHS)
                sites[f"site-{i}"] = site_entry(reply.record(), "mixture")
            accepted += 1
        except BadReply as exc:
            assert str(exc), "a rejection must carry its reason"
            rejected.append(str(exc))
    metrics = strategy_metrics(Config(), ("whole_tumor", "tumor_core", "enhancing_tumor"), sites, 1.0)
    assert "mean Dice" in headline(metrics) or "no held-out metrics" in headline(metrics)
    write_report(tmp_path, {"mome": metrics})
    assert (tmp_path / "report.md").exists()
    assert accepted > 100 and len(rejected) > 300  # both paths are exercised
    assert any("label spec" in r for r in rejected) and any("expected a number" in r for r in rejected)


@pytest.mark.parametrize("labels", ['{"kind": "regions", "names": ["a"], "members": [[1]], "values": "x"}',
                                    "[" * 5000 + "]" * 5000, '{"kind": "regions"}'])
def test_a_label_spec_that_does_not_parse_is_a_rejection(labels):
    request = Message(RecordDict(), dst_node_id=1, message_type="query.describe")
    with pytest.raises(BadReply, match="label spec does not parse"):
        description(Message(_describe_content(labels), reply_to=request))


def test_a_list_where_a_number_belongs_is_a_rejection():
    request = Message(RecordDict(), dst_node_id=1, message_type="evaluate")
    for key, value in (("dice_mean", [0.5]), ("dice", 0.5), ("mixture_global.dice_mean", [0.1, 0.2])):
        with pytest.raises(BadReply, match=key):
            parse_reply(Message(_evaluate_content({**EVALUATED, key: value}, None), reply_to=request), None, "site-a")


def _mutated_reply(content: RecordDict, rng: random.Random) -> RecordDict:
    """One of the ways a misbehaving site can bend a reply: its metrics, its model record, its site record."""
    from tests.test_integrity import huge_header_array

    out = RecordDict(dict(content.items()))
    choice = rng.randrange(6)
    if choice == 0:
        out[Key.METRICS] = MetricRecord(_mutated_metrics(rng))
    elif choice == 1 and Key.MODEL in out:
        state = unpack(out[Key.MODEL])
        name = rng.choice(list(state))
        state[name] = rng.choice([np.full_like(state[name], np.nan), state[name] * 1e6, np.zeros(7, np.float32),
                                  state[name].astype(np.float64)])
        out[Key.MODEL] = pack(state)
    elif choice == 2 and Key.MODEL in out:
        out[Key.MODEL] = rng.choice([ArrayRecord(), ArrayRecord({PACKED_DATA: huge_header_array()}),
                                     ArrayRecord({**dict(out[Key.MODEL].items()), PACKED_DATA: huge_header_array()})])
    elif choice == 3:
        out["site"] = rng.choice([ConfigRecord({}), ConfigRecord({"site-id": "site-a"}),
                                  ConfigRecord({"site-id": "x" * 500}), ConfigRecord({"site-id": 7})])
    elif choice == 4:
        out[rng.choice(["extra", Key.GATE, Key.OUTCOME])] = rng.choice([ArrayRecord(), ConfigRecord({"status": 3})])
    else:
        out[Key.METRICS] = rng.choice([ConfigRecord({"n_train": "many"}), MetricRecord({})])
    return out


def test_a_thousand_mutated_replies_through_the_coordinator_leave_reasons_and_a_report(labels, tmp_path):
    """The same through the Coordinator itself (reading, checking, aggregating, checkpointed state, metrics.json and
    report.md): site-b bends every reply it sends after describing itself, site-a stays honest."""
    from tests.test_coordinator_units import ScriptedGrid

    rng = random.Random(1)

    class FuzzedGrid(ScriptedGrid):
        mutated = 0

        def _answer(self, msg: Message, site: str) -> RecordDict:
            content = super()._answer(msg, site)
            if site != "site-b" or msg.metadata.message_type == "query.describe":
                return content
            self.mutated += 1
            return _mutated_reply(content, rng)

    cfg = TINY_RUN.replace(warmup_rounds=1, expert_rounds=2, gate_rounds=1)
    grid = FuzzedGrid({1: "site-a", 2: "site-b"}, labels)
    coordinator = Coordinator(grid, cfg, tmp_path)
    coordinator.describe()
    coordinator.state.base = {"w": np.ones(3, np.float32)}
    while grid.mutated < 1000:
        for index, (phase, _) in enumerate(coordinator.steps):
            good, extra = coordinator._run_step(index, phase)
            coordinator.state.history.append({"step": index, "phase": phase, "round": 0, "seconds": 0.0,
                                              "sites": {r.site_id: r.record() for r in good}, **extra})
    assert coordinator.state.dropped and all(d["reason"] for d in coordinator.state.dropped)
    reasons = {d["reason"][:60] for d in coordinator.state.dropped}
    assert len(reasons) >= 5, reasons
    metrics = strategy_metrics(cfg, ("whole_tumor", "tumor_core", "enhancing_tumor"),
                               final_sites(coordinator.state, "mome"), 1.0, dropped=coordinator.state.dropped)
    write_report(tmp_path, {"mome": json.loads(json.dumps(metrics))})
    assert (tmp_path / "report.md").exists() and np.isfinite(coordinator.state.gate["mlp.2.bias"]).all()
