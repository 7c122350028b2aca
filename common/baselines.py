"""Non-federated reference strategies on per-site (train, val, test) batch lists: local-only and centralised."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from common.config import Config
from common.metrics import evaluate, expert_predictor
from common.model import build_expert
from common.train import train_expert

Batch = Mapping[str, torch.Tensor]
Site = tuple[Sequence[Batch], Sequence[Batch], Sequence[Batch]]  # (train, val, test)


def _n_out(sites: Sequence[Site]) -> int:
    for split in (s for site in sites for s in site):
        if split:
            return int(split[0]["label"].shape[1])
    raise ValueError("no site has any batch")


def run_local(sites: Sequence[Site], cfg: Config, kind: str, n_clinical: int, progress: bool = False) -> list[dict]:
    """Each site trains its own expert (same seed, same epochs) on its own data and is tested on its own test set."""
    n_out, results = _n_out(sites), []
    for train, val, test in sites:
        model = build_expert(cfg, n_clinical, n_out)
        history = train_expert(model, list(train), list(val), cfg, kind, progress=progress)
        metrics = evaluate(expert_predictor(model, kind), test, kind)
        results.append({**metrics, "best_val_dice": history["best_val_dice"], "n_train": history["n_train"]})
    return results


def run_centralized(
    sites: Sequence[Site], cfg: Config, kind: str, n_clinical: int, progress: bool = False
) -> list[dict]:
    """One expert on the pooled training (and validation) data of all sites, evaluated on each site's test set."""
    pooled_train = [b for train, _, _ in sites for b in train]
    pooled_val = [b for _, val, _ in sites for b in val]
    model = build_expert(cfg, n_clinical, _n_out(sites))
    history = train_expert(model, pooled_train, pooled_val, cfg, kind, progress=progress)
    return [
        {**evaluate(expert_predictor(model, kind), test, kind), "best_val_dice": history["best_val_dice"],
         "n_train": history["n_train"]}
        for _, _, test in sites
    ]
