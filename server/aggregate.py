"""Combine site updates: sample-weighted FedAvg, or DRO weights that favour higher-loss sites."""

from __future__ import annotations

import numpy as np


def site_weights(n_examples: list[int], losses: list[float], mode: str,
                 temperature: float) -> np.ndarray:
    """FedAvg: proportional to cases. DRO: cases x exp(loss / T), so worse-off sites count more."""
    n = np.asarray(n_examples, dtype=np.float64)
    if mode == "dro":
        loss = np.asarray(losses, dtype=np.float64)
        n = n * np.exp((loss - loss.max()) / max(temperature, 1e-6))
    elif mode != "fedavg":
        raise ValueError(f"unknown aggregation {mode!r} (fedavg | dro)")
    return n / n.sum()


def weighted_average(updates: list[dict[str, np.ndarray]], weights: np.ndarray) -> dict[str, np.ndarray]:
    """Average float arrays; integer buffers (e.g. batch counters) take the first site's value."""
    out = {}
    for name, first in updates[0].items():
        if first.dtype.kind == "f":
            total = sum(w * u[name].astype(np.float64) for w, u in zip(weights, updates))
            out[name] = total.astype(first.dtype)
        else:
            out[name] = first.copy()
    return out


def aggregate(updates: list[dict[str, np.ndarray]], n_examples: list[int], losses: list[float],
              mode: str = "fedavg", temperature: float = 1.0) -> dict[str, np.ndarray]:
    """The server's one way of combining site updates: weights from case counts (and losses, for DRO)."""
    return weighted_average(updates, site_weights(n_examples, losses, mode, temperature))
