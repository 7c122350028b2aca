"""Exact Shapley values of modality contributions (imaging modalities + clinical) by masking the presence vector."""

from __future__ import annotations

from functools import partial
from math import factorial
from typing import Callable, Iterable, Mapping, Sequence

import torch

from mome.common.labels import LabelKind
from mome.common.metrics import dice_score
from mome.common.model import ExpertNet, probabilities

Batch = Mapping[str, torch.Tensor]
Score = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (probs, target) -> per-case value [B]
MODES = ("reuse", "naive")


def _subset_values(model: ExpertNet, batch: Batch, players: list[int], kind: LabelKind, score: Score,
                   target: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """v(S) per case for every subset S of players (bitmask order); hidden players are masked out of presence."""
    image, presence, clinical = batch["image"], batch["presence"], batch["clinical"]
    m_count = model.n_modalities
    feats = model.stem_features(image) if mode == "reuse" else None  # computed once, shared by all subsets
    values = []
    for mask in range(2 ** len(players)):
        keep = torch.zeros(presence.shape[1], dtype=presence.dtype, device=presence.device)
        keep[[p for i, p in enumerate(players) if mask >> i & 1]] = 1.0
        subset = presence * keep
        if mode == "reuse":
            logits = model.decode(feats, subset, clinical)
        else:  # naive: zero the hidden channels and rerun the whole network
            logits = model(image * subset[:, :m_count, None, None, None], subset, clinical)
        values.append(score(probabilities(logits, kind), target).double())
    return values


def shapley_values(
    model: ExpertNet,
    batch: Batch,
    kind: LabelKind,
    score: Score | None = None,
    reference: str = "label",
    mode: str = "reuse",
) -> torch.Tensor:
    """Per-case Shapley values [B, M+1] float64 (index M = clinical; 0 for absent players).

    The value of a subset is `score(probs, target)` (default soft mean Dice over regions), with target the
    label (reference="label") or the thresholded full-input prediction (reference="prediction").
    Players are the modalities present in at least one case of the batch: a modality a case lacks is a null
    player for it, which leaves that case's other Shapley values unchanged, so one batched pass is exact.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    score = score or partial(dice_score, kind=kind)
    presence = batch["presence"]
    players = [j for j in range(presence.shape[1]) if bool((presence[:, j] > 0).any())]
    n = len(players)
    model.eval()
    with torch.no_grad():
        if reference == "label":
            target = batch["label"]
        elif reference == "prediction":
            target = probabilities(model(batch["image"], presence, batch["clinical"]), kind)
        else:
            raise ValueError(f"unknown reference {reference!r}; expected 'label' or 'prediction'")
        values = _subset_values(model, batch, players, kind, score, target, mode)
    phi = torch.zeros(presence.shape, dtype=torch.float64)
    for i, player in enumerate(players):
        for mask in range(2**n):
            if mask >> i & 1:
                continue
            size = bin(mask).count("1")
            weight = factorial(size) * factorial(n - size - 1) / factorial(n)
            phi[:, player] += weight * (values[mask | 1 << i] - values[mask])
    return phi * (presence > 0).cpu()


def site_shapley(model: ExpertNet, batches: Iterable[Batch], kind: LabelKind, names: Sequence[str], **kwargs) -> dict:
    """Mean Shapley value per player over the site's cases that have it, with those counts.

    names: the M imaging modality names; the clinical player is reported as "clinical".
    """
    phis, presences = [], []
    for batch in batches:
        phis.append(shapley_values(model, batch, kind, **kwargs))
        presences.append((batch["presence"] > 0).cpu().double())
    players = list(names) + ["clinical"]
    if not phis:
        return {"shapley": {p: 0.0 for p in players}, "n_present": {p: 0 for p in players}, "n": 0}
    phi, present = torch.cat(phis), torch.cat(presences)
    counts = present.sum(0)
    means = phi.sum(0) / counts.clamp(min=1)
    return {
        "shapley": {p: float(v) for p, v in zip(players, means)},
        "n_present": {p: int(c) for p, c in zip(players, counts)},
        "n": int(phi.shape[0]),
    }
