"""The shape of metrics.json: per-site entries of a strategy and the across-site summary."""

from __future__ import annotations

from common.wire import Status

HEADLINE = {"mome": "mixture", "fedavg": "model", "fedavg-ft": "model"}


def site_entry(flat: dict, headline: str) -> dict:
    """{'mixture.dice': [...], 'expert.dice_mean': x, ...} -> headline metrics on top, the rest by variant."""
    entry: dict = {k: flat[k] for k in ("n_train", "n_val", "n_test") if k in flat}
    variants: dict[str, dict] = {}
    for key, value in flat.items():
        variant, dot, metric = key.partition(".")
        if dot:
            variants.setdefault(variant, {})[metric] = value
        elif key not in entry and key != "num-examples":
            entry[key] = value
    entry.update(variants.pop(headline, {}))
    if variants:
        entry["variants"] = variants
    return entry


def summarise(sites: dict[str, dict]) -> dict:
    """Mean over the sites that have metrics and the worst of them, on mean Dice (HD95 averaged alongside).

    Sites without held-out labels (or whose evaluation failed) are counted, never averaged in as NaN or 0."""
    scored = {s: float(e["dice_mean"]) for s, e in sites.items() if e.get("dice_mean") is not None}
    out = {"n_sites": len(sites), "n_evaluated": len(scored),
           "n_models_saved": sum(int(e.get("model_saved", 0)) for e in sites.values())}
    if not scored:
        return out
    worst = min(scored, key=scored.get)
    hd = [float(e["hd95"]) for e in sites.values() if e.get("hd95") is not None]
    return {**out, "dice_mean": sum(scored.values()) / len(scored), "worst_site": worst,
            "worst_dice": scored[worst], "hd95_mean": sum(hd) / len(hd) if hd else None}


def strategy_status(sites: dict[str, dict], error: str = "") -> dict:
    """A strategy failed when it raised, or when its final step failed at every site (no site kept a model)."""
    if error:
        return {"status": "failed", "error": error}
    if not any(Status(e.get("status", Status.FAILED)).ok for e in sites.values()):
        reasons = sorted({e.get("reason", "") for e in sites.values()} - {""})
        return {"status": "failed", "error": "the final step failed at every site"
                + (f": {'; '.join(reasons)}" if reasons else " (no site answered)")}
    return {"status": "ok"}


def failed_strategy(strategy: str, error: str, wall_time_s: float) -> dict:
    """metrics.json of a strategy that ended without results."""
    return {"strategy": strategy, **strategy_status({}, error), "sites": {}, "summary": summarise({}),
            "rounds": [], "dropped": [], "wall_time_s": wall_time_s}


def headline(metrics: dict) -> str:
    """One line for logs and the terminal: mean and worst Dice, or why there are none (never 'nan')."""
    if metrics.get("status") == "failed":
        return f"FAILED: {metrics.get('error', 'no reason recorded')}"
    summary = metrics.get("summary", {})
    if summary.get("dice_mean") is None:
        return (f"no held-out metrics (no site has labelled held-out cases); "
                f"{summary.get('n_models_saved', 0)} of {summary.get('n_sites', 0)} site models saved")
    return (f"mean Dice {summary['dice_mean']:.3f} over {summary['n_evaluated']} site(s), worst site "
            f"{summary['worst_site']} ({summary['worst_dice']:.3f})")
