"""The site's own record of everything it sent: one JSON line per reply in <out-dir>/audit.jsonl, and the summary
`mome audit` prints for a data-protection officer."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import Counter, defaultdict
from pathlib import Path

from flwr.app import Message

from mome.common.wire import PACKED_LAYOUT, array_digests, reply_digest

AUDIT_FILE = "audit.jsonl"

log = logging.getLogger("mome.audit")


def entry(request: Message, reply: Message, site_id: str) -> dict:
    """What the audit keeps of one reply: when, to which run and step, what action, and every value sent."""
    base = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "run_id": request.metadata.run_id, "site": site_id,
            "step": request.metadata.group_id, "action": request.metadata.message_type}
    if reply.has_error():
        return {**base, "error": {"code": reply.error.code, "reason": reply.error.reason}, "bytes": 0}
    content = reply.content
    digests = array_digests(content)
    arrays = [{"name": f"{r}/{n}", "shape": list(a.shape), "dtype": a.dtype, "sha256": digests[f"{r}/{n}"]}
              for r, record in content.array_records.items() for n, a in record.items()]
    tensors = {r: json.loads(record[PACKED_LAYOUT].numpy().tobytes()) for r, record in content.array_records.items()
               if PACKED_LAYOUT in record}  # what a packed state holds: [name, shape, dtype] per tensor
    return {**base, "arrays": arrays, "tensors": tensors, "digest": reply_digest(digests),
            "metrics": {k: v for rec in content.metric_records.values() for k, v in rec.items()},
            "configs": {name: dict(rec) for name, rec in content.config_records.items()},
            "bytes": sum(rec.count_bytes() for rec in content.array_records.values())}


def append(out_dir: Path, record: dict) -> None:
    """One line per reply, appended and flushed to disk before the reply leaves."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(out_dir / AUDIT_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as fh:
        fh.write(json.dumps(record, default=str) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read(path: Path) -> list[dict]:
    """The audit's entries; a last line torn by a crash mid-write is left out (and said), any other bad line is an
    error: the log must not be silently shortened."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    entries = []
    for number, line in enumerate(lines, 1):
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise ValueError(f"{path}: line {number} is not a JSON entry; the audit log was altered") from None
            log.warning("%s: the last line is torn (a write cut short) and is left out", path)
    return entries


def summary(path: Path) -> str:
    """Per run: the time span, replies per action, bytes, the arrays and metric keys that left, and the errors."""
    runs: dict[int, list[dict]] = defaultdict(list)
    for item in read(path):
        runs[item["run_id"]].append(item)
    lines = [f"audit of {path}: {sum(len(v) for v in runs.values())} replies in {len(runs)} run(s)"]
    for run_id, items in runs.items():
        actions = Counter(i["action"] for i in items)
        tensors = {(r, name): shape for i in items for r, layout in i.get("tensors", {}).items()
                   for name, shape, _ in layout}
        metric_keys = sorted({k for i in items for k in i.get("metrics", {})})
        configs = sorted({f"{r}.{k}" for i in items for r, v in i.get("configs", {}).items() for k in v})
        errors = [f"step {i['step']} {i['action']}: {i['error']['reason']}" for i in items if "error" in i]
        lines += [f"\nrun {run_id} ({items[0]['site']}): {items[0]['time']} .. {items[-1]['time']}",
                  "  replies: " + ", ".join(f"{a} x{n}" for a, n in sorted(actions.items())),
                  f"  bytes of weights sent: {sum(i['bytes'] for i in items):,}",
                  f"  tensors sent: {_tensors(tensors)}",
                  f"  metric keys sent: {', '.join(metric_keys) or 'none'}",
                  f"  text fields sent: {', '.join(configs) or 'none'}",
                  f"  error replies: {len(errors)}"] + [f"    {e}" for e in errors]
        privacy = [i["metrics"]["dp_epsilon"] for i in items if "dp_epsilon" in i.get("metrics", {})]
        if privacy:
            lines.append(f"  differential privacy: epsilon {max(privacy):.3g} at delta "
                         f"{items[-1]['metrics'].get('dp_delta', float('nan')):.0e} after this run")
    return "\n".join(lines)


def _tensors(tensors: dict[tuple[str, str], list[int]]) -> str:
    """Per record (model, gate...): how many weight tensors and values left, and a few of their names."""
    if not tensors:
        return "none"
    parts = []
    for record in sorted({r for r, _ in tensors}):
        names = sorted(n for r, n in tensors if r == record)
        values = sum(math.prod(tensors[record, n]) for n in names)
        parts.append(f"{record}: {len(names)} tensors, {values:,} values ({', '.join(names[:3])}, ...)")
    return "; ".join(parts)
