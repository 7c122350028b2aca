"""Atomic per-round checkpoints of the server state, and resuming from the latest one."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from common.atomic import atomic_write_bytes


def save_checkpoint(folder: Path, step: int, state: dict[str, Any]) -> Path:
    """state holds numpy arrays, numbers and strings only (the server's own objects)."""
    path = folder / f"step_{step:03d}.pkl"
    atomic_write_bytes(path, pickle.dumps({"step": step, **state}))
    atomic_write_bytes(folder / "latest", path.name.encode())
    return path


def load_latest(folder: Path) -> dict[str, Any] | None:
    pointer = folder / "latest"
    if not pointer.exists():
        return None
    with (folder / pointer.read_text().strip()).open("rb") as fh:
        return pickle.load(fh)
