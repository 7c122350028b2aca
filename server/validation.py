"""Check every update a site sends before it touches server state; say why a bad one is dropped."""

from __future__ import annotations

import numpy as np


class RejectedUpdate(ValueError):
    """An update that failed a check; the message is the logged reason."""


def check_update(update: dict[str, np.ndarray], sent: dict[str, np.ndarray],
                 max_norm: float) -> None:
    """Same names, shapes and dtypes as what was sent, all finite, and a bounded change."""
    missing, extra = sorted(set(sent) - set(update)), sorted(set(update) - set(sent))
    if missing or extra:
        raise RejectedUpdate(f"unexpected array names (missing {missing[:3]}, extra {extra[:3]})")
    squared = 0.0
    for name, ref in sent.items():
        arr = update[name]
        if arr.shape != ref.shape:
            raise RejectedUpdate(f"{name}: shape {arr.shape}, expected {ref.shape}")
        if arr.dtype != ref.dtype:
            raise RejectedUpdate(f"{name}: dtype {arr.dtype}, expected {ref.dtype}")
        if arr.dtype.kind == "f":
            if not np.isfinite(arr).all():
                raise RejectedUpdate(f"{name}: non-finite values")
            squared += float(np.sum((arr.astype(np.float64) - ref) ** 2))
    norm = squared ** 0.5
    if norm > max_norm:
        raise RejectedUpdate(f"update norm {norm:.3g} exceeds the bound {max_norm:.3g}")
