"""The shape of metrics.json: per-site entries of a strategy and the across-site summary."""

from __future__ import annotations

import json
from pathlib import Path

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
    """Mean over sites and the worst site, on mean Dice (HD95 averaged alongside)."""
    if not sites:
        return {"n_sites": 0}
    dice = {s: float(e["dice_mean"]) for s, e in sites.items()}
    worst = min(dice, key=dice.get)
    hd = [float(e["hd95"]) for e in sites.values() if e.get("hd95") is not None]
    return {"n_sites": len(sites), "dice_mean": sum(dice.values()) / len(dice), "worst_site": worst,
            "worst_dice": dice[worst], "hd95_mean": sum(hd) / len(hd) if hd else None}
