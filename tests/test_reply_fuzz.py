"""No reply can crash the coordinator: mutations of valid replies go through the code the ServerApp runs on them (reading
a reply, then assembling metrics.json and report.md from what was accepted); each is either used or rejected with a
reason (BadReply), nothing else."""

from __future__ import annotations

import json
import math
import random

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from mome.common.config import Config
from mome.common.labels import LabelKind, LabelSpec
from mome.common.wire import Key, Status
from mome.server.replies import BadReply, description, parse_reply
from mome.server.report import write_report
from mome.server.results import headline, site_entry, strategy_metrics
from tests.test_coordinator_units import serverapp_identity  # noqa: F401  (autouse: Messages outside a run)

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
