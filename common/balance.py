"""Modality-balanced training: OGM-GE style loss/gradient factors that slow the dominant modality."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from mome.common.labels import LabelKind
from mome.common.metrics import dice_score
from mome.common.model import probabilities


def aux_scores(aux_logits: torch.Tensor, label: torch.Tensor, present: torch.Tensor, kind: LabelKind) -> torch.Tensor:
    """Each modality's contribution on a batch [M]: its auxiliary head's soft Dice on the cases that have it.

    NaN marks a modality no case of the batch has.
    """
    out = torch.full((aux_logits.shape[1],), float("nan"))
    for m in range(aux_logits.shape[1]):
        rows = present[:, m] > 0
        if rows.any():
            out[m] = dice_score(probabilities(aux_logits[rows, m].detach(), kind), label[rows], kind).mean()
    return out


class ModalityBalancer:
    """EMA of each modality's measured contribution -> per-modality factors in (0, 1].

    ratio_m = score_m / mean(score of the other seen modalities); factor_m = 1 - tanh(alpha * relu(ratio_m - 1)).
    A modality ahead of the others learns slower; the others keep factor 1 (OGM-GE, Peng et al. 2022).
    """

    def __init__(self, names: Sequence[str], alpha: float = 1.0, momentum: float = 0.9):
        self.names, self.alpha, self.momentum = tuple(names), float(alpha), float(momentum)
        self.scores = torch.zeros(len(self.names), dtype=torch.float64)
        self.seen = torch.zeros(len(self.names), dtype=torch.bool)
        self.history: list[dict[str, float]] = []

    def update(self, scores: torch.Tensor) -> None:
        """Fold in one batch's scores [M]; NaN marks a modality not measured on this batch."""
        scores = scores.detach().to(torch.float64).cpu()
        measured = ~torch.isnan(scores)
        # the first measurement initialises the EMA so early factors are not biased towards 0
        first = measured & ~self.seen
        self.scores[first] = scores[first]
        again = measured & ~first
        self.scores[again] = self.momentum * self.scores[again] + (1 - self.momentum) * scores[again]
        self.seen |= measured

    @property
    def factors(self) -> torch.Tensor:
        """Current factors [M] (float32); 1 where a modality or all of its peers are still unmeasured."""
        out = torch.ones(len(self.names), dtype=torch.float64)
        if self.alpha <= 0 or int(self.seen.sum()) < 2:
            return out.float()
        for m in torch.nonzero(self.seen).flatten().tolist():
            peers = self.seen.clone()
            peers[m] = False
            ratio = self.scores[m] / self.scores[peers].mean().clamp(min=1e-6)
            out[m] = 1.0 - math.tanh(self.alpha * max(float(ratio) - 1.0, 0.0))
        return out.float()

    def scale_gradients(self, stems: Sequence[nn.Module]) -> None:
        """Multiply each modality stem's gradients by its factor (call between backward and step)."""
        for stem, factor in zip(stems, self.factors.tolist()):
            for param in stem.parameters():
                if param.grad is not None:
                    param.grad.mul_(factor)

    def log_epoch(self) -> dict[str, float]:
        """Snapshot factors and smoothed scores, append to history and return it."""
        entry = {f"factor/{n}": f for n, f in zip(self.names, self.factors.tolist())}
        entry.update({f"score/{n}": float(s) for n, s in zip(self.names, self.scores)})
        self.history.append(entry)
        return entry
