"""Non-federated references on the same sites, splits and budget: `local` (each site alone) and `centralized`."""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from mome.common.config import Config
from mome.common.labels import LabelKind
from mome.common.model import ExpertNet, load_expert
from mome.common.train import train_expert

Batch = Mapping[str, torch.Tensor]
Splits = tuple[Iterable[Batch], Sequence[Batch]]  # a site's (train patches, val batches)


def train_local(sites: Sequence[Splits], cfg: Config, kind: LabelKind, n_out: int) -> list[ExpertNet]:
    """Each site trains its own expert (same seed, same epochs) on its own data only; the last epoch is kept."""
    models = []
    for train, val in tqdm(sites, desc="local: sites", unit="site", leave=False):
        model = load_expert(cfg, n_out)
        train_expert(model, train, list(val), cfg, kind, progress=True, keep_best=False)
        models.append(model)
    return models


def train_centralized(train: Iterable[Batch], val: Sequence[Batch], cfg: Config, kind: LabelKind,
                      n_out: int) -> ExpertNet:
    """One expert on the pooled training data of all sites (its last epoch, as every strategy's)."""
    model = load_expert(cfg, n_out)
    train_expert(model, train, val, cfg, kind, progress=True, keep_best=False)
    return model
