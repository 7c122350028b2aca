"""The one declared schema of what a site may send, per action: record names, the arrays of the model it was sent,
and every metric key with its shape. The ClientApp refuses to send anything outside it; tests check every reply
against it key by key, so a new metric must be declared here first."""

from __future__ import annotations

import re
from dataclasses import dataclass

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from mome.common.wire import NUM_EXAMPLES, PACKED_LAYOUT, Action, Key


@dataclass(frozen=True)
class Sizes:
    """Lengths of the list-valued metrics in one exchange."""

    modalities: int  # imaging sequences of the federation vocabulary
    regions: int  # scored label regions (or classes)
    experts: int  # experts in the message (0 outside MoME)


INT, FLOAT = "int", "float"
PER_MODALITY, PER_MODALITY_AND_CLINICAL, PER_REGION, PER_EXPERT = "modalities", "modalities+1", "regions", "experts"
XYZ = "xyz"  # three values, RAS axis order

COUNTS = {"n_train": INT, "n_val": INT, "n_test": INT, "n_unlabelled": INT, NUM_EXAMPLES: INT}
PRIVACY = {"dp_epsilon": FLOAT, "dp_delta": FLOAT}  # privacy spent so far (the pre-noise norm stays local)
SUPPRESSION = {"suppressed": INT, "gate_on_train": INT}  # flags: what min-cases withheld, or how the gate learned
# variants a site scores on its held-out cases ("mixture" is the one it keeps; "mixture_personal" when it chose another)
EVALUATED = ("mixture", "mixture_global", "mixture_personal", "expert", "model")

DESCRIBE = {"n_train": INT, "n_val": INT, "n_gate": INT, "n_test": INT, "n_unlabelled": INT, "skipped": INT}
# aggregate geometry for the plan, over >= min-cases cases (common.cases): medians of spacing and head extent
# (scanner protocol and anatomy scale; with an odd count a median is some case's value), means of intensities
GEOMETRY = {"spacing": XYZ, "extent_mm": XYZ, "intensity_p005": PER_MODALITY, "intensity_p50": PER_MODALITY,
            "intensity_p995": PER_MODALITY}
TRAIN = {**COUNTS, **PRIVACY, **SUPPRESSION, "train_loss": FLOAT, "val_dice": FLOAT,
         "modality_factors": PER_MODALITY}
GATE = {**COUNTS, **PRIVACY, **SUPPRESSION, "train_loss": FLOAT, "n_gate": INT, "gate_weights": PER_EXPERT}
EVALUATE = {**COUNTS, **SUPPRESSION, **PRIVACY, "model_saved": INT,
            "n_segmented": INT, "shapley": PER_MODALITY_AND_CLINICAL, "gate_weights": PER_EXPERT, "final_choice": INT,
            **{f"{v}.{m}": kind for v in EVALUATED for m, kind in
               (("dice", PER_REGION), ("dice_mean", FLOAT), ("hd95", FLOAT))}}

CONFIGS = {  # per action: record -> the keys it may carry (all strings)
    "query.describe": {"site": {"site-id", "labels", "modalities", "worker"}},  # worker: its version and code hash
    str(Action.TRAIN_SHARED): {"site": {"site-id"}},
    str(Action.TRAIN_EXPERT): {"site": {"site-id"}},
    str(Action.TRAIN_GATE): {"site": {"site-id"}},
    str(Action.EVALUATE): {"site": {"site-id"}, Key.OUTCOME: {"status", "reason", "segmentation"}},
}
METRICS = {"query.describe": {**DESCRIBE, **GEOMETRY}, str(Action.TRAIN_SHARED): TRAIN, str(Action.TRAIN_EXPERT): TRAIN,
           str(Action.TRAIN_GATE): GATE, str(Action.EVALUATE): EVALUATE}
MAX_TEXT = 2000  # the label spec as JSON is the longest string a site sends
_LIST_LENGTH = {PER_MODALITY: lambda s: s.modalities, PER_MODALITY_AND_CLINICAL: lambda s: s.modalities + 1,
                PER_REGION: lambda s: s.regions, PER_EXPERT: lambda s: s.experts, XYZ: lambda s: 3}


def sent_model(action: str, request: RecordDict) -> ArrayRecord | None:
    """The weights a training reply must mirror: the gate for train.gate, the model otherwise; None elsewhere."""
    if not action.startswith("train."):
        return None
    name = Key.GATE if action == Action.TRAIN_GATE else Key.MODEL
    return request.array_records.get(name)


def violations(action: str, reply: RecordDict, request: RecordDict, sizes: Sizes) -> list[str]:
    """Everything in a reply outside the declared schema for its action (empty: the reply may be sent)."""
    if action not in METRICS:
        return [f"undeclared action {action!r}"]
    problems = []
    allowed = {Key.METRICS, *CONFIGS[action]} | ({Key.MODEL} if sent_model(action, request) is not None else set())
    problems += [f"undeclared record {name!r}" for name in reply if name not in allowed]
    for name, record in reply.items():
        if name == Key.METRICS:
            problems += _metric_problems(record, METRICS[action], sizes) if isinstance(record, MetricRecord) \
                else [f"{name!r} is not a MetricRecord"]
        elif name == Key.MODEL:
            problems += _array_problems(record, sent_model(action, request))
        elif name in CONFIGS[action]:
            problems += _config_problems(name, record, CONFIGS[action][name])
    return problems


def _metric_problems(record: MetricRecord, declared: dict[str, str], sizes: Sizes) -> list[str]:
    problems = []
    for key, value in record.items():
        kind = declared.get(key)
        if kind is None:
            problems.append(f"undeclared metric {key!r}")
        elif kind in _LIST_LENGTH:
            if not isinstance(value, list) or len(value) != _LIST_LENGTH[kind](sizes):
                problems.append(f"metric {key!r} must be a list of {_LIST_LENGTH[kind](sizes)} ({kind})")
        elif kind == INT and not (isinstance(value, int) and not isinstance(value, bool)):
            problems.append(f"metric {key!r} must be an integer")
        elif kind == FLOAT and not isinstance(value, (int, float)):
            problems.append(f"metric {key!r} must be a number")
    return problems


def _array_problems(record, sent: ArrayRecord | None) -> list[str]:
    if not isinstance(record, ArrayRecord) or sent is None:
        return ["undeclared arrays"]
    names, expected = set(record), set(sent)
    if names != expected:
        return [f"arrays differ from the model sent (extra {sorted(names - expected)[:3]}, "
                f"missing {sorted(expected - names)[:3]})"]
    problems = [f"array {n!r}: shape {record[n].shape} / {record[n].dtype}, sent {sent[n].shape} / {sent[n].dtype}"
                for n in sorted(names) if (record[n].shape, record[n].dtype) != (sent[n].shape, sent[n].dtype)]
    if not problems and PACKED_LAYOUT in names and record[PACKED_LAYOUT].data != sent[PACKED_LAYOUT].data:
        problems.append("the packed model's tensors (names, shapes, dtypes) differ from the model sent")
    return problems


def _config_problems(name: str, record, keys: set[str]) -> list[str]:
    if not isinstance(record, ConfigRecord):
        return [f"{name!r} is not a ConfigRecord"]
    problems = [f"undeclared field {name}.{k}" for k in record if k not in keys]
    problems += [f"{name}.{k} must be a string of at most {MAX_TEXT} characters" for k, v in record.items()
                 if k in keys and not (isinstance(v, str) and len(v) <= MAX_TEXT)]
    return problems


def expert_count(request: RecordDict) -> int:
    prefix = str(Key.EXPERT_PREFIX)
    return sum(1 for name in request.array_records if name.startswith(prefix))


ERROR_CODES = {"internal": 4000, "site-data": 4001, "policy": 4002, "payload": 4003}
ERROR_REASON = re.compile(r"(internal|site-data|policy|payload): [^\n]{1,300}")  # what a site's error reply says
