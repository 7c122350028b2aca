"""Gather a step's replies and read each into plain values, or say why it is malformed: nothing a site sends can
raise out of a step.

Arrays are checked against what the server sent (names, shapes, dtypes) from the .npy header *before* anything is
allocated, so a header that declares a huge shape costs nothing."""

from __future__ import annotations

import io
import json
import math
import re
import time
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from mome.common.config import Config, Strategy
from mome.common.labels import LabelSpec
from mome.common.schema import ERROR_REASON
from mome.common.wire import (NUM_EXAMPLES, PACKED_DATA, PACKED_LAYOUT, SITE_ID, Key, Spec, Status, array_digests,
                         packed_layout, packed_size, reply_digest, split_packed)


PULL_INTERVAL = 0.25  # Grid.send_and_receive waits 3 s between pulls over the deployed link: seconds on every step


def send_and_receive(grid: Grid, messages: list[Message], timeout: float) -> list[Message]:
    """Grid.send_and_receive, pulling replies every PULL_INTERVAL seconds until all are in or the timeout."""
    pending = {msg_id for msg_id in grid.push_messages(messages) if msg_id}  # a failed push has no id to wait for
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    while True:
        got = list(grid.pull_messages(pending))
        replies += got
        pending -= {msg.metadata.reply_to_message_id for msg in got}
        if not pending or time.monotonic() >= deadline:
            return replies
        time.sleep(PULL_INTERVAL)


class BadReply(ValueError):
    """A reply that cannot be used; the message is the logged reason (never the site's own text)."""


@dataclass
class Reply:
    site_id: str
    metrics: dict
    state: dict[str, np.ndarray] | None
    outcome: dict[str, str] | None = None  # the final step's status and reason
    digest: str = ""  # of the arrays as received; the site's audit log keeps the same

    def record(self) -> dict:
        """What the run's history keeps of this reply: its metrics, the final step's outcome, the arrays' digest."""
        return {**self.metrics, **(self.outcome or {}), **({"digest": self.digest} if self.digest else {})}


def claimed_site(msg: Message) -> str:
    """The site id a reply says it comes from (checked against its node's binding by the caller)."""
    record = _record(msg, "site", ConfigRecord)
    value = record.get(SITE_ID)
    if not isinstance(value, str):
        raise BadReply("the 'site' record has no site-id string")
    return value


def list_lengths(cfg: Config, labels: dict | None, n_experts: int) -> dict[str, int]:
    """How many values each list metric of a reply holds in this federation (results and reports index them)."""
    modalities = len(cfg.modality_names)
    out = {"shapley": modalities + 1, "modality_factors": modalities}
    if labels is not None:
        out["dice"] = len(LabelSpec.from_dict(labels).metric_names)
    if Strategy(cfg.strategy).mixes and n_experts:
        out["gate_weights"] = n_experts
    return out


def parse_reply(msg: Message, expected: Spec | None, site_id: str, lengths: dict[str, int] | None = None) -> Reply:
    """Metrics (finite numbers; lists only where LIST_METRICS says, as long as `lengths` says; non-negative integer
    counts), the model when one is expected (exactly the sent layout; a site may withhold it with the `suppressed`
    flag, min-cases), and the final step's outcome when present."""
    metrics = _metrics(_record(msg, Key.METRICS, MetricRecord), lengths or {})
    state = None
    extra = sorted(set(msg.content.array_records) - ({Key.MODEL} if expected is not None else set()))
    if extra:
        raise BadReply(f"unexpected array records {extra[:3]}")
    if expected is not None and not (metrics.get("suppressed") == 1 and Key.MODEL not in msg.content):
        state = decode(_record(msg, Key.MODEL, ArrayRecord), expected)
    outcome = _outcome(msg.content[Key.OUTCOME]) if Key.OUTCOME in msg.content.config_records else None
    return Reply(site_id, metrics, state, outcome, reply_digest(array_digests(msg.content)))


def _record(msg: Message, name: str, kind: type):
    if name not in msg.content:
        raise BadReply(f"no '{name}' record")
    record = msg.content[name]
    if not isinstance(record, kind):
        raise BadReply(f"'{name}' is a {type(record).__name__}, expected a {kind.__name__}")
    return record


# metrics a site sends as lists (one value per region, expert or modality, also under a variant prefix such as
# "mixture."); every other metric is one number
LIST_METRICS = frozenset({"dice", "gate_weights", "shapley", "modality_factors"})
MAX_LIST = 256
COUNT_METRICS = frozenset({"n_train", "n_val", "n_test", "n_unlabelled", "n_gate", "n_segmented", "model_saved",
                           "suppressed", "gate_on_train", "skipped", "final_choice"})


def _metrics(record: MetricRecord, lengths: dict[str, int]) -> dict:
    metrics = {k: (list(v) if isinstance(v, list) else v) for k, v in record.items()}
    count = metrics.get(NUM_EXAMPLES)
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise BadReply(f"{NUM_EXAMPLES} must be a non-negative integer")
    loss = metrics.get("train_loss")
    if loss is not None and not (isinstance(loss, (int, float)) and math.isfinite(loss)):
        raise BadReply("train_loss is not a finite number")
    for key, value in metrics.items():
        _check_metric(key, value, lengths.get(key.rsplit(".", 1)[-1]))
    return metrics


def _check_metric(key: str, value, length: int | None) -> None:
    """A list where LIST_METRICS says (of `length` values when known), a number elsewhere; finite (an infinite DP
    epsilon says no privacy); counts non-negative integers."""
    is_list = key.rsplit(".", 1)[-1] in LIST_METRICS
    if isinstance(value, list) != is_list:
        raise BadReply(f"metric {key[:60]!r} is a {type(value).__name__}, expected {'a list' if is_list else 'a number'}")
    if is_list and (len(value) > MAX_LIST or length is not None and len(value) != length):
        raise BadReply(f"metric {key[:60]!r} has {len(value)} values, expected {length or f'at most {MAX_LIST}'}")
    if not all(math.isfinite(v) or (key == "dp_epsilon" and v == math.inf) for v in (value if is_list else [value])):
        raise BadReply(f"metric {key[:60]!r} is not finite")
    if key in COUNT_METRICS and not (isinstance(value, int) and value >= 0):
        raise BadReply(f"metric {key!r} must be a non-negative integer")


def _outcome(record) -> dict[str, str]:
    """A final-step outcome as the server keeps it: a known status (anything else counts as failed) and a short
    reason."""
    if not isinstance(record, ConfigRecord):
        raise BadReply("'outcome' is not a ConfigRecord")
    values = {k: str(v)[:300] for k, v in record.items() if k in ("status", "reason", "segmentation")}
    if values.get("status") not in {str(s) for s in Status}:
        values = {"status": str(Status.FAILED), "reason": "unknown final-step status from the site"}
    return values


def decode(record: ArrayRecord, expected: Spec) -> dict[str, np.ndarray]:
    """A packed state (common.wire.pack) holding exactly the expected tensors, read without trusting any header:
    its layout must be the expected one byte for byte, its data exactly that layout's size."""
    names = sorted(record)
    if names != sorted((PACKED_DATA, PACKED_LAYOUT)):
        raise BadReply(f"not a packed model state (arrays {names[:3]})")
    want = packed_layout(expected)
    got = _decode_one(PACKED_LAYOUT, record[PACKED_LAYOUT], (len(want),), np.dtype(np.uint8)).tobytes()
    if got != want:
        raise BadReply("the model's layout (tensor names, shapes, dtypes) differs from the model sent")
    data = _decode_one(PACKED_DATA, record[PACKED_DATA], (packed_size(expected),), np.dtype(np.uint8))
    return split_packed(data.data, expected)


def _decode_one(name: str, array: Array, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    if not isinstance(array, Array) or array.stype != "numpy.ndarray":
        raise BadReply(f"{name}: not a numpy array")
    stream = io.BytesIO(array.data)
    try:
        version = np.lib.format.read_magic(stream)
        header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                  else np.lib.format.read_array_header_2_0)(stream)
    except (ValueError, OSError, SyntaxError) as exc:
        raise BadReply(f"{name}: unreadable array header ({type(exc).__name__})") from None
    declared_shape, fortran, declared_dtype = header
    if tuple(declared_shape) != shape:
        raise BadReply(f"{name}: declared shape {_short(declared_shape)}, expected {shape}")
    if declared_dtype != dtype or fortran:
        raise BadReply(f"{name}: declared dtype {declared_dtype}, expected {dtype}")
    body = memoryview(array.data)[stream.tell():]
    if len(body) != dtype.itemsize * math.prod(shape):
        raise BadReply(f"{name}: {len(body)} bytes of data for a {shape} {dtype} array")
    return np.frombuffer(body, dtype=dtype).reshape(shape).copy()


def _short(shape) -> str:
    text = str(tuple(shape))
    return text if len(text) <= 60 else text[:57] + "..."


def sender(sent: list[Message], reply: Message) -> int:
    """The node a reply answers for: error replies made by the SuperLink carry its own id as source."""
    for msg in sent:
        if msg.metadata.message_id == reply.metadata.reply_to_message_id:
            return msg.metadata.dst_node_id
    return reply.metadata.src_node_id


def error_kind(reason: str) -> str:
    """What the coordinator keeps of a site's error reply: the exception type. Flower's reason also carries the
    exception's text, which can hold site paths or case ids."""
    if ERROR_REASON.fullmatch(reason):  # the site's guard wrote it for the coordinator: a code and a short reason
        return reason
    found = re.search(r"<class '([\w.]+)'>", reason)
    return f"{found.group(1).rsplit('.', 1)[-1]} raised at the site" if found else "the site's app failed"


def claim(msg: Message) -> str:
    """The site id a describe reply claims ('' if it has none)."""
    try:
        return "" if msg.has_error() else claimed_site(msg)
    except Exception:
        return ""


def description(msg: Message) -> tuple[str, dict, dict]:
    """(site id, label spec, declared counts) of a describe reply; the spec as the server would write it. The
    counts also carry `worker` (the site worker's version and code hash) when the site told it."""
    site = claimed_site(msg)
    metrics = _record(msg, Key.METRICS, MetricRecord)
    try:
        spec = LabelSpec.checked(json.loads(str(msg.content["site"]["labels"]))).to_dict()
    except (ValueError, TypeError, KeyError, RecursionError) as exc:
        raise BadReply(f"its label spec does not parse: {str(exc)[:120]}") from None
    worker = msg.content["site"].get("worker")
    told = {"worker": worker[:200]} if isinstance(worker, str) else {}
    return site, spec, {**dict(metrics), **told}
