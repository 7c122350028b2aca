"""`mome status`: where a coordinator's run stands, read from what it already writes (the latest checkpoint's
metadata, and metrics.json once the run has ended). Reads no weights and asks no process."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mome.common.state import META_KEY


@dataclass
class RunStatus:
    folder: Path
    checkpoint: Path | None = None
    saved_at: float | None = None  # the checkpoint's modification time (seconds since the epoch)
    done: int = 0  # steps finished
    steps: list[tuple[str, int]] = field(default_factory=list)  # the run's steps: (phase, round)
    bindings: dict[str, int] = field(default_factory=dict)  # site id -> node id
    replied: list[str] = field(default_factory=list)  # sites whose reply the last finished step used
    dropped: list[dict] = field(default_factory=list)  # replies dropped: step, site, reason
    refused: list[dict] = field(default_factory=list)  # nodes refused: step, node, (site), reason
    outcome: str | None = None  # metrics.json's status once the run has ended ("ok" / "failed")
    error: str | None = None


def strategy_folder(path: Path) -> Path:
    """The strategy's output folder: `path` itself if a run wrote there (config.json at its start, checkpoints,
    metrics.json), else its one sub-folder that does (`runs/compose` -> `runs/compose/mome`)."""
    if _is_run(path) and not _strategies(path):
        return path
    found = _strategies(path)
    if len(found) == 1:
        return found[0]
    if not found:
        raise ValueError(f"{path}: no run here (no checkpoints/ or metrics.json); give the run's output folder, "
                         "e.g. runs/compose/mome")
    raise ValueError(f"{path} holds several runs ({', '.join(p.name for p in found)}): name one")


def _is_run(path: Path) -> bool:
    return any((path / name).exists() for name in ("config.json", "checkpoints", "metrics.json"))


def _strategies(path: Path) -> list[Path]:
    return sorted(p for p in path.glob("*/") if _is_run(p)) if path.is_dir() else []


def _latest(folder: Path) -> Path | None:
    pointer = folder / "latest"
    if pointer.is_file() and (folder / pointer.read_text().strip()).is_file():
        return folder / pointer.read_text().strip()
    found = sorted(folder.glob("step_*.npz"))
    return found[-1] if found else None


def _meta(path: Path) -> dict:
    """A checkpoint's JSON metadata alone (the weights stay unread)."""
    with np.load(path, allow_pickle=False) as data:
        return json.loads(str(data[META_KEY]))


def run_status(path: Path) -> RunStatus:
    status = RunStatus(strategy_folder(path))
    status.checkpoint = _latest(status.folder / "checkpoints")
    if status.checkpoint is not None:
        meta = _meta(status.checkpoint)
        status.saved_at = status.checkpoint.stat().st_mtime
        status.done = int(meta.get("step", 0))
        status.steps = [tuple(s) for s in (meta.get("recipe") or {}).get("steps", [])]
        status.bindings = dict(meta.get("bindings", {}))
        history = meta.get("history", [])
        status.replied = sorted(history[-1].get("sites", {})) if history else []
        status.dropped = list(meta.get("dropped", []))
        status.refused = [e for e in meta.get("identity", []) if e.get("event") == "refused"]
    metrics, started = status.folder / "metrics.json", status.folder / "config.json"
    since = [t for t in (status.saved_at, started.stat().st_mtime if started.is_file() else None) if t is not None]
    if metrics.is_file() and metrics.stat().st_mtime >= max(since, default=0):  # else an earlier attempt's
        ended = json.loads(metrics.read_text())
        status.outcome, status.error = ended.get("status"), ended.get("error")
    return status


def _step_name(status: RunStatus, index: int) -> str:
    if index < len(status.steps):
        phase, rnd = status.steps[index]
        return f"{phase} round {rnd + 1}"
    return f"step {index + 1}"


def describe(status: RunStatus, now: float | None = None) -> str:
    total = len(status.steps) or "?"
    lines = [f"run: {status.folder}"]
    if status.outcome:
        lines.append(f"ended: {status.outcome}" + (f" ({status.error})" if status.error else "")
                     + f"; results in {status.folder / 'metrics.json'}")
    if status.checkpoint is None:
        lines.append("no step finished yet (no checkpoint): the run is starting, waiting for sites, or not started")
        return "\n".join(lines)
    ago = (now if now is not None else time.time()) - (status.saved_at or 0)
    lines.append(f"steps finished: {status.done} of {total}; last: {_step_name(status, status.done - 1)} "
                 f"(checkpoint {status.checkpoint.name}, {ago / 60:.0f} min ago)")
    if not status.outcome and status.done < len(status.steps):
        lines.append(f"now: {_step_name(status, status.done)}")
    lines.append(f"sites bound ({len(status.bindings)}): "
                 + (", ".join(f"{s} (node {n})" for s, n in sorted(status.bindings.items())) or "none"))
    missing = sorted(set(status.bindings) - set(status.replied))
    lines.append(f"replied in the last step: {', '.join(status.replied) or 'none'}"
                 + (f"; not used: {', '.join(missing)}" if missing else ""))
    for drop in status.dropped:
        lines.append(f"dropped at {_step_name(status, drop['step'])}: {drop['site']}: {drop['reason']}")
    for event in status.refused:
        who = f"node {event['node']}" + (f" ({event['site']})" if event.get("site") else "")
        lines.append(f"refused at {_step_name(status, event['step'])}: {who}: {event['reason']}")
    return "\n".join(lines)
