"""Combine site updates so that no single site can take over the result: each change clipped relative to the
median site's, weights from the cases each site declared (capped), an upper bound on any site's share, DRO on clipped
losses, or Flower's median / trimmed mean, and the combined change bounded like each site's."""

from __future__ import annotations

import numpy as np
from flwr.server.strategy.aggregate import aggregate_median, aggregate_trimmed_avg

from mome.common.config import GateAggregation


class AggregationError(ValueError):
    """The aggregate is unusable (non-finite); the server keeps its previous state."""


def cap_weights(weights: np.ndarray, max_weight: float) -> np.ndarray:
    """Normalise, then move any share above max_weight to the other sites in proportion (water-filling).
    A cap below 1/n cannot be met and is raised to 1/n (equal weights)."""
    w = np.clip(np.nan_to_num(np.asarray(weights, dtype=np.float64)), 0.0, None)
    w = w / w.sum() if w.sum() > 0 else np.full(len(w), 1.0 / len(w))
    cap = max(max_weight, 1.0 / len(w))
    while (over := w > cap * (1 + 1e-9)).any():
        excess = float((w[over] - cap).sum())
        w[over] = cap
        free = w < cap * (1 - 1e-9)
        share = w[free] if w[free].sum() > 0 else np.ones(int(free.sum()))
        w[free] += excess * share / share.sum()
    return w


def site_weights(n_examples: list[int], losses: list[float], mode: str, temperature: float,
                 max_weight: float = 1.0, max_loss: float = 10.0) -> np.ndarray:
    """FedAvg: proportional to cases. DRO: cases x exp(loss / T), losses clipped to [0, max_loss] so a huge or
    faked loss buys at most a bounded factor. Either way no site's share exceeds max_weight."""
    n = np.asarray(n_examples, dtype=np.float64)
    if mode == GateAggregation.DRO:
        loss = np.clip(np.nan_to_num(np.asarray(losses, dtype=np.float64), nan=max_loss), 0.0, max_loss)
        n = n * np.exp((loss - loss.max()) / max(temperature, 1e-6))
    elif mode != GateAggregation.FEDAVG:
        raise ValueError(f"{mode!r} is not a weighted aggregation (fedavg | dro)")
    return cap_weights(n, max_weight)


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


def flower_robust(updates: list[dict[str, np.ndarray]], mode: str, trim_fraction: float) -> dict[str, np.ndarray]:
    """Flower's own median / trimmed-mean aggregation (what FedMedian and FedTrimmedAvg compute) over the updates:
    each site counts once, whatever it declared."""
    names = list(updates[0])
    results = [([u[name] for name in names], 1) for u in updates]
    try:
        layers = (aggregate_median(results) if mode == GateAggregation.MEDIAN
                  else aggregate_trimmed_avg(results, trim_fraction))
    except ValueError as exc:  # Config refuses such a fraction; a hand-built call may not
        raise AggregationError(f"trimmed mean with gate-trim-fraction {trim_fraction}: {exc}") from None
    return {name: (np.asarray(layer).astype(first.dtype) if first.dtype.kind == "f" else first.copy())
            for name, layer, first in zip(names, layers, updates[0].values())}


MIN_SITES_TO_CLIP = 3  # a median of two changes is their mean: either site would set the other's bound


def _change(update: dict[str, np.ndarray], sent: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float64) - sent[k] for k, v in update.items() if v.dtype.kind == "f"}


def _norm(change: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(float(np.square(v).sum()) for v in change.values())))


def _scaled(sent: dict[str, np.ndarray], update: dict[str, np.ndarray], change: dict[str, np.ndarray],
            scale: float) -> dict[str, np.ndarray]:
    return {k: ((sent[k] + scale * change[k]).astype(v.dtype) if k in change else v) for k, v in update.items()}


def clip_to_median(updates: list[dict[str, np.ndarray]], sent: dict[str, np.ndarray],
                   factor: float) -> tuple[list[dict[str, np.ndarray]], float]:
    """Each site's change (update - sent) scaled down to at most `factor` x the median site's change norm, so
    that a site that pushes harder than the others gets no more say than they do; (the updates, that bound).
    Off (bound inf) below MIN_SITES_TO_CLIP sites or with factor 0."""
    if factor <= 0 or len(updates) < MIN_SITES_TO_CLIP:
        return updates, float("inf")
    changes = [_change(u, sent) for u in updates]
    norms = [_norm(c) for c in changes]
    bound = factor * float(np.median(norms))
    return [u if n <= bound else _scaled(sent, u, c, bound / n)
            for u, c, n in zip(updates, changes, norms)], bound


def bounded(result: dict[str, np.ndarray], sent: dict[str, np.ndarray], bound: float) -> dict[str, np.ndarray]:
    """The aggregate's own change held to the same bound as each site's: a round moves the weights no further than
    the sites' median change allows, whichever rule combined them."""
    change = _change(result, sent)
    norm = _norm(change)
    return result if norm <= bound else _scaled(sent, result, change, bound / norm)


def aggregate(updates: list[dict[str, np.ndarray]], n_examples: list[int], losses: list[float],
              mode: str = "fedavg", temperature: float = 1.0, max_weight: float = 1.0, max_loss: float = 10.0,
              trim_fraction: float = 0.2, sent: dict[str, np.ndarray] | None = None,
              clip: float = 0.0) -> tuple[dict[str, np.ndarray], list[float]]:
    """The server's one way of combining site updates; returns the aggregate and each site's weight (equal for
    the robust modes). With `sent` (what the sites were sent) and clip > 0, each change is first clipped to clip x
    the median change and the aggregate's change to the same bound. Raises AggregationError if the result is not
    finite."""
    bound = float("inf")
    if sent is not None:
        updates, bound = clip_to_median(updates, sent, clip)
    if mode in (GateAggregation.MEDIAN, GateAggregation.TRIMMED_MEAN):
        result, weights = flower_robust(updates, mode, trim_fraction), np.full(len(updates), 1.0 / len(updates))
    else:
        weights = site_weights(n_examples, losses, mode, temperature, max_weight, max_loss)
        result = weighted_average(updates, weights)
    if not all(np.isfinite(a).all() for a in result.values() if a.dtype.kind == "f"):
        raise AggregationError("the aggregate is not finite; the previous weights are kept")
    if sent is not None and np.isfinite(bound):
        result = bounded(result, sent, bound)
    return result, [float(w) for w in weights]
