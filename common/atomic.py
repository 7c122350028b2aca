"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: Path, payload: bytes, mode: int | None = None) -> Path:
    """Write to a temporary file in the same folder, then rename over the target. The temporary file is created
    0600 (mkstemp), so a private key is never readable by others, not even for an instant; `mode` widens it
    before the rename (0644 for a certificate)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: Path, payload: dict) -> Path:
    return atomic_write_bytes(path, json.dumps(payload, indent=2, default=float).encode())
