"""Atomic per-step checkpoints of the server state (one .npz, no pickle), and resuming from the latest readable
one made with the same training config and plan."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from mome.common.atomic import atomic_write_bytes
from mome.common.state import flatten_states, load_state, save_state, unflatten_states

log = logging.getLogger("mome.server")

WEIGHTS = ("base", "gate", "experts")  # server-state entries holding model weights; the rest is JSON metadata


def _flatten(state: dict[str, Any]) -> tuple[dict, dict]:
    meta = {k: v for k, v in state.items() if k not in WEIGHTS}
    meta.update({f"{key}:present": state.get(key) is not None for key in WEIGHTS})
    meta["experts:sites"] = sorted(state.get("experts") or {})
    return flatten_states({key: state[key] for key in WEIGHTS if state.get(key) is not None}), meta


def _unflatten(arrays: dict, meta: dict) -> dict[str, Any]:
    state = {k: v for k, v in meta.items() if ":" not in k}
    weights = unflatten_states(arrays)
    for key in WEIGHTS:
        state[key] = weights.get(key, {}) if meta[f"{key}:present"] else None
    state["experts"] = {site: state["experts"].get(site, {}) for site in meta["experts:sites"]}
    return state


def save_checkpoint(folder: Path, step: int, state: dict[str, Any]) -> Path:
    """Write step_NNN.npz, then point `latest` at it (a crash between the two keeps the previous one)."""
    arrays, meta = _flatten({**state, "step": step})
    path = save_state(folder / f"step_{step:03d}.npz", arrays, meta)
    atomic_write_bytes(folder / "latest", path.name.encode())
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    return _unflatten(*load_state(path))


def load_latest(folder: Path) -> dict[str, Any] | None:
    """The checkpoint `latest` points at or, if that one is missing or unreadable, the newest readable one."""
    pointer = folder / "latest"
    named = [folder / pointer.read_text().strip()] if pointer.is_file() else []
    candidates = named + sorted(folder.glob("step_*.npz"), reverse=True) if folder.is_dir() else named
    for path in candidates:
        try:
            return load_checkpoint(path)
        except Exception as exc:  # a torn or foreign file: fall back to the one before
            log.warning("checkpoint %s unreadable (%s); trying an older one", path.name, type(exc).__name__)
    return None


def fingerprint(training: dict[str, Any], steps: list) -> dict[str, Any]:
    """What a checkpoint's weights depend on: the training config and the plan of steps, with their hash."""
    body = {"config": training, "plan": [list(s) for s in steps]}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()
    return {**body, "hash": digest}


class ResumeRefused(RuntimeError):
    """A checkpoint made with another training config or plan."""


def check_resumable(saved: dict[str, Any] | None, current: dict[str, Any], step: int) -> None:
    """Refuse to resume from a checkpoint whose fingerprint differs, naming the keys that differ."""
    if saved is None:
        raise ResumeRefused(f"the checkpoint after step {step} records no config; resume with --force-resume")
    if saved["hash"] == current["hash"]:
        return
    old, new = saved["config"], current["config"]
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    changes = ", ".join(f"{k.replace('_', '-')} ({old.get(k)!r} -> {new.get(k)!r})" for k in keys[:8])
    raise ResumeRefused(f"the checkpoint after step {step} was made with another config: {changes or 'the plan'}; "
                        "rerun with the same config, another run folder, or --force-resume (force-resume=true)")
