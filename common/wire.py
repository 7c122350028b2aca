"""What crosses the wire: message keys, actions, and numpy state <-> Flower records."""

from __future__ import annotations

import hashlib
import json
import math
import re
from enum import StrEnum
from typing import Mapping, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict


PACKED_LAYOUT, PACKED_DATA = "layout", "data"  # the two Arrays of a packed model state (`pack`)
SHARED_EXPERT = "_federation"  # the shared model as an expert of the mixture: no site id starts with "_"


class Key(StrEnum):
    """Record names inside a RecordDict."""

    CONFIG = "config"  # run settings and the phase, server -> site
    METRICS = "metrics"  # scalar metrics only, site -> server
    MODEL = "model"  # the one model a site trained (expert, shared model or gate)
    GATE = "gate"  # the global gate, server -> site
    EXPERT_PREFIX = "expert."  # expert.<site-id> (or expert.<SHARED_EXPERT>), server -> site
    OUTCOME = "outcome"  # how a site's final step ended (status, reason), site -> server


class Status(StrEnum):
    """How a site's final step ended. The model is saved before evaluation, so only FAILED loses it."""

    EVALUATED = "evaluated"
    NO_LABELS = "no-held-out-labels"  # model saved; nothing labelled to score it on
    WITHHELD = "metrics-withheld"  # model saved; too few labelled held-out cases to release a score (min-cases)
    EVALUATION_FAILED = "evaluation-failed"  # model saved; evaluation raised at the site
    FAILED = "failed"  # the final step failed or never answered (set by the server)

    @property
    def ok(self) -> bool:
        """The site ended with its model and whatever metrics its data allows."""
        return self in (Status.EVALUATED, Status.NO_LABELS, Status.WITHHELD)


class Action(StrEnum):
    """Message types: Flower routes `train.<action>` to the matching ClientApp handler."""

    TRAIN_SHARED = "train.shared"  # one shared model (warm-up base, FedAvg)
    TRAIN_EXPERT = "train.expert"  # the site's own expert from the base
    TRAIN_GATE = "train.gate"  # the gate over frozen experts
    EVALUATE = "evaluate"


NUM_EXAMPLES = "num-examples"  # counts training cases, not batches
SITE_ID = "site-id"
SITE_ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")  # also a safe path and checkpoint-key component


def site_id_from_name(name: str) -> str:
    """A folder name as a site id: lower case, anything outside [a-z0-9-] becomes '-' ('Hospital_A' -> 'hospital-a')."""
    return re.sub(r"[^a-z0-9-]", "-", name.lower()).strip("-")[:64]


def check_site_id(site_id: str) -> str:
    if not SITE_ID_PATTERN.fullmatch(site_id):
        raise ValueError(f"site id {site_id!r} must match {SITE_ID_PATTERN.pattern} (lower-case letters, digits, '-')")
    return site_id


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """One Array per tensor: the form Flower's own strategies aggregate (never sent: see `pack`)."""
    return ArrayRecord({name: Array(np.ascontiguousarray(a)) for name, a in arrays.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


Spec = Mapping[str, tuple[Sequence[int], np.dtype]]  # tensor name -> (shape, dtype)


def spec_of(arrays: dict[str, np.ndarray]) -> Spec:
    return {name: (tuple(a.shape), np.dtype(a.dtype)) for name, a in arrays.items()}


def packed_layout(spec: Spec) -> bytes:
    """The layout of a packed state: [name, shape, dtype] per tensor, in name order, as JSON bytes."""
    return json.dumps([[n, [int(d) for d in spec[n][0]], np.dtype(spec[n][1]).str] for n in sorted(spec)]).encode()


def packed_size(spec: Spec) -> int:
    return sum(np.dtype(dtype).itemsize * math.prod(shape) for shape, dtype in spec.values())


def pack(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """A model state as two Arrays, its layout and all its bytes in that order. Flower moves every Array as
    objects of their own, one request each on every hop between ServerApp, SuperLink, SuperNode and ClientApp:
    a network's ~80 tensors cost a deployment step tens of seconds, its two packed arrays almost nothing."""
    data = b"".join(np.ascontiguousarray(arrays[n]).tobytes() for n in sorted(arrays))
    return ArrayRecord({PACKED_LAYOUT: Array(np.frombuffer(packed_layout(spec_of(arrays)), dtype=np.uint8)),
                        PACKED_DATA: Array(np.frombuffer(data, dtype=np.uint8))})


def split_packed(data: bytes | memoryview, spec: Spec) -> dict[str, np.ndarray]:
    """The tensors of a packed state's bytes (exactly packed_size(spec) of them), in name order."""
    if len(data) != packed_size(spec):
        raise ValueError(f"packed state holds {len(data)} bytes, its layout {packed_size(spec)}")
    state, offset = {}, 0
    for name in sorted(spec):
        shape, dtype = spec[name]
        size = np.dtype(dtype).itemsize * math.prod(shape)
        state[name] = np.frombuffer(data[offset:offset + size], dtype=dtype).reshape(shape).copy()
        offset += size
    return state


def unpack(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The state a trusted peer packed (the server checks a site's reply with its own decoder instead)."""
    layout = json.loads(record[PACKED_LAYOUT].numpy().tobytes())
    return split_packed(record[PACKED_DATA].numpy().data, {n: (tuple(s), np.dtype(d)) for n, s, d in layout})


def record_bytes(content: RecordDict) -> int:
    """Bytes of array payload in a message (what dominates the traffic)."""
    return sum(rec.count_bytes() for rec in content.array_records.values())


def config_record(values: dict) -> ConfigRecord:
    return ConfigRecord({k: v for k, v in values.items() if v is not None})


def metric_record(values: dict) -> MetricRecord:
    """Only numbers and lists of numbers may leave a site."""
    clean = {}
    for key, value in values.items():
        if isinstance(value, (list, tuple)):
            clean[key] = [float(v) for v in value]
        elif isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool):
            clean[key] = float(value) if isinstance(value, (float, np.floating)) else int(value)
        else:
            raise TypeError(f"metric {key!r} is not numeric: {type(value).__name__}")
    return MetricRecord(clean)


def array_digests(content: RecordDict) -> dict[str, str]:
    """SHA-256 of each array's bytes as they cross the wire, keyed record/name."""
    return {f"{rec_name}/{name}": hashlib.sha256(array.data).hexdigest()
            for rec_name, record in content.array_records.items() for name, array in record.items()}


def reply_digest(digests: dict[str, str]) -> str:
    """One digest over all arrays of a reply: the site's audit log and the coordinator's history both keep it."""
    return hashlib.sha256(json.dumps(sorted(digests.items())).encode()).hexdigest() if digests else ""
