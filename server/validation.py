"""Check every decoded update before it touches server state; say why a bad one is dropped."""

from __future__ import annotations

import numpy as np

from mome.common.state import float_changes, l2_norm


class RejectedUpdate(ValueError):
    """An update that failed a check; the message is the logged reason."""


def update_ratio(update: dict[str, np.ndarray], sent: dict[str, np.ndarray]) -> tuple[float, float]:
    """(L2 norm of the change, that norm relative to the norm of what was sent) over the float arrays."""
    change = l2_norm(float_changes(update, sent).values())
    reference = l2_norm(a for a in sent.values() if a.dtype.kind == "f")
    return change, (change / reference if reference > 0 else 0.0)  # all-zero weights: only the ceiling applies


def dp_allowance(sent: dict[str, np.ndarray], clip: float, noise_multiplier: float) -> float:
    """The change an honest site under differential privacy may make: its clipped update plus Gaussian noise of
    std noise_multiplier x clip per weight, whose norm concentrates at that std x sqrt(weights) (4 sigma slack)."""
    if clip <= 0:
        return 0.0
    d = sum(a.size for a in sent.values() if a.dtype.kind == "f")
    return clip + noise_multiplier * clip * (np.sqrt(d) + 4.0)


def check_update(update: dict[str, np.ndarray], sent: dict[str, np.ndarray], max_ratio: float,
                 max_norm: float, allowance: float = 0.0) -> float:
    """All finite, and a bounded change: at most max_ratio x the norm of what was sent (or the allowance for the
    federation's DP noise, if larger), and never above max_norm (names, shapes and dtypes were checked when the
    reply was decoded). Returns the change's ratio."""
    for name, arr in update.items():
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise RejectedUpdate(f"{name}: non-finite values")
    change, ratio = update_ratio(update, sent)
    if change > max(max_norm, allowance):
        raise RejectedUpdate(f"update norm {change:.3g} exceeds the ceiling max-update-norm {max_norm:.3g}")
    if ratio > max_ratio and change > allowance:
        raise RejectedUpdate(f"update changes the weights by {ratio:.3g} x their norm, above max-update-ratio "
                             f"{max_ratio:.3g}")
    return ratio
