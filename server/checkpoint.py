"""Atomic per-step checkpoints of the server state (one .npz, no pickle), and resuming from the latest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.atomic import atomic_write_bytes
from common.state import flatten_states, load_state, save_state, unflatten_states

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
    pointer = folder / "latest"
    if not pointer.exists():
        return None
    return load_checkpoint(folder / pointer.read_text().strip())
