"""Atomic per-step checkpoints of the server state (one .npz, no pickle), and resuming from the latest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.atomic import atomic_write_bytes
from common.state import load_state, save_state

# server-state entries holding model weights: name -> nesting depth (1: a state dict, 2: dict of state dicts)
WEIGHTS = {"base": 1, "gate": 1, "experts": 2}


def _flatten(state: dict[str, Any]) -> tuple[dict, dict]:
    arrays, meta = {}, {k: v for k, v in state.items() if k not in WEIGHTS}
    for key, depth in WEIGHTS.items():
        value = state.get(key)
        meta[f"{key}:present"] = value is not None
        groups = {"": value} if depth == 1 else (value or {})
        for group, weights in groups.items():
            prefix = f"{key}/{group}/" if depth == 2 else f"{key}/"
            arrays.update({prefix + name: a for name, a in (weights or {}).items()})
    meta["experts:sites"] = sorted(state.get("experts") or {})
    return arrays, meta


def _unflatten(arrays: dict, meta: dict) -> dict[str, Any]:
    state = {k: v for k, v in meta.items() if ":" not in k}
    state["experts"] = {site: {} for site in meta["experts:sites"]}
    for key in ("base", "gate"):
        state[key] = {} if meta[f"{key}:present"] else None
    for name, array in arrays.items():
        key, _, rest = name.partition("/")
        if key == "experts":
            site, _, param = rest.partition("/")
            state["experts"][site][param] = array
        else:
            state[key][rest] = array
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
