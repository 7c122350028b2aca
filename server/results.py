"""The shape of a strategy's metrics.json: per-site entries, the across-site summary, the strategy's status."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

from mome.common.config import Config, Strategy
from mome.common.wire import Status

if TYPE_CHECKING:
    from mome.server.checkpoint import ServerState

OK, FAILED = "ok", "failed"  # a strategy's status in metrics.json


def headline_variant(strategy: str) -> str:
    """Which of a site's evaluated variants its headline metrics are: the personalised mixture for MoME."""
    return "mixture" if Strategy(strategy).mixes else "model"


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
    scored = {s: float(e["dice_mean"]) for s, e in sites.items()
              if e.get("dice_mean") is not None and math.isfinite(e["dice_mean"])}
    out = {"n_sites": len(sites), "n_evaluated": len(scored),
           "n_models_saved": sum(int(e.get("model_saved", 0)) for e in sites.values())}
    if not scored:
        return out
    worst = min(scored, key=scored.get)
    hd = [float(e["hd95"]) for s, e in sites.items() if s in scored and e.get("hd95") is not None]
    return {**out, "dice_mean": sum(scored.values()) / len(scored), "worst_site": worst,
            "worst_dice": scored[worst], "hd95_mean": sum(hd) / len(hd) if hd else None}


def site_ok(entry: dict) -> bool:
    """The site ended with its model saved and the metrics its data allows."""
    return bool(entry.get("model_saved")) and entry.get("status") in {s for s in Status if s.ok}


def strategy_status(sites: dict[str, dict], error: str = "") -> dict:
    """A strategy failed when it raised, or when its final step failed at every site: no site ended with its
    model saved and its metrics (a site whose evaluation raised kept its model but counts as failed here)."""
    if error:
        return {"status": FAILED, "error": error}
    if not any(site_ok(e) for e in sites.values()):
        reasons = sorted({e.get("reason", "") for e in sites.values()} - {""})
        return {"status": FAILED, "error": "the final step failed at every site"
                + (f": {'; '.join(reasons)}" if reasons else " (no site answered)")}
    return {"status": OK}


def strategy_metrics(cfg: Config, regions: Sequence[str], sites: dict[str, dict], wall_time_s: float,
                     error: str = "", **extra: Any) -> dict:
    """A strategy's metrics.json (federated or not; `extra`: rounds, dropped, traffic, experts where it has them)."""
    return {"strategy": cfg.strategy, **strategy_status(sites, error), "regions": list(regions),
            "modalities": list(cfg.modality_names), "sites": sites, "summary": summarise(sites), "rounds": [],
            "dropped": [], **extra, "wall_time_s": wall_time_s, "config": cfg.to_dict()}


def final_sites(state: ServerState, strategy: str) -> dict[str, dict]:
    """Per-site entries of a federated run's final step: each replying site's metrics and outcome, and every site
    dropped at that step as failed, with its reason."""
    last = state.history[-1] if state.history else None
    if last is None or last["phase"] != "evaluate":
        return {}
    sites = {s: site_entry(m, headline_variant(strategy)) for s, m in last["sites"].items()}
    for drop in state.dropped:
        if drop["step"] == last["step"] and drop["site"] not in sites:
            sites[drop["site"]] = {"status": str(Status.FAILED), "reason": drop["reason"], "model_saved": 0}
    known = {s for step in state.history for s in step["sites"]} | set(state.experts)
    for site in known - set(sites):  # a node the SuperLink no longer lists was sent nothing at the end
        sites[site] = {"status": str(Status.FAILED), "reason": "not connected at the final step", "model_saved": 0}
    for site, entry in sites.items():
        traffic = state.traffic.get(site, {})
        entry.update(bytes_up=traffic.get("up", 0), bytes_down=traffic.get("down", 0))
    return dict(sorted(sites.items()))


def headline(metrics: dict) -> str:
    """One line for logs and the terminal: mean and worst Dice, or why there are none (never 'nan')."""
    if metrics.get("status") == FAILED:
        return f"FAILED: {metrics.get('error', 'no reason recorded')}"
    summary = metrics.get("summary", {})
    if summary.get("dice_mean") is None:
        return (f"no held-out metrics (no site has labelled held-out cases, or their evaluation failed); "
                f"{summary.get('n_models_saved', 0)} of {summary.get('n_sites', 0)} site models saved")
    return (f"mean Dice {summary['dice_mean']:.3f} over {summary['n_evaluated']} site(s), worst site "
            f"{summary['worst_site']} ({summary['worst_dice']:.3f})")
