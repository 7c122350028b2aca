"""Segmentation measures: soft Dice scores for training signals, Dice and HD95 per region for evaluation."""

from __future__ import annotations

import math
import warnings
from typing import Callable, Iterable, Mapping, Sequence

import torch
from monai.losses import DiceLoss
from monai.metrics import DiceMetric, HausdorffDistanceMetric

from mome.common.labels import LabelKind
from mome.common.gate import GateNet, gate_weights
from mome.common.model import ExpertNet, expert_logits, mixing_space, mixture_logits, model_logits, probabilities
from mome.common.patches import Window

Batch = Mapping[str, torch.Tensor]
Predictor = Callable[[Batch], torch.Tensor]


def foreground(x: torch.Tensor, kind: LabelKind, hard: bool = True) -> torch.Tensor:
    """The scored channels: every region, or every class but background (argmax one-hot when hard)."""
    if LabelKind(kind) is LabelKind.REGIONS:
        return (x > 0.5).float() if hard else x
    if hard:
        x = torch.nn.functional.one_hot(x.argmax(1), x.shape[1]).movedim(-1, 1).float()
    return x[:, 1:]


def dice_score(probs: torch.Tensor, target: torch.Tensor, kind: LabelKind, hard: bool = False) -> torch.Tensor:
    """Per-case Dice [B] averaged over scored channels; soft unless hard. Both empty scores 1 (smoothing)."""
    pred, ref = foreground(probs, kind, hard), foreground(target, kind, hard=True)
    per_channel = 1.0 - DiceLoss(reduction="none")(pred, ref)
    return per_channel.flatten(1).mean(1)


def _dice_per_case(pred: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    # ignore_empty=False: empty target and empty prediction -> 1, empty target only -> 0 (no NaN)
    return DiceMetric(include_background=True, reduction="none", ignore_empty=False)(pred, ref)


def dice_per_case(probs: torch.Tensor, target: torch.Tensor, kind: LabelKind) -> torch.Tensor:
    """Thresholded Dice [B, R] of each case and scored region, with evaluate's conventions."""
    return _dice_per_case(foreground(probs.detach().float(), kind), foreground(target.float(), kind))


def _hd95_per_case(pred: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """HD95 [B, R] in voxels; one side empty -> volume diagonal (max penalty), both empty -> 0."""
    diagonal = math.sqrt(sum(s * s for s in pred.shape[2:]))
    pred_any, ref_any = pred.flatten(2).any(2), ref.flatten(2).any(2)
    out = torch.where(pred_any == ref_any, 0.0, diagonal)
    metric = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
    with warnings.catch_warnings():
        # MONAI 1.5 warns about its own internal use of a deprecated argument; nothing to act on here
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        for r in range(pred.shape[1]):
            both = pred_any[:, r] & ref_any[:, r]
            if both.any():
                out[both, r] = metric(pred[both, r : r + 1], ref[both, r : r + 1]).flatten().float()
    return out


def evaluate(predict_probs: Predictor, batches: Iterable[Batch], kind: LabelKind, with_hd95: bool = True) -> dict:
    """Dice per scored region, mean Dice, mean HD95 (voxels) and case count over the batches.

    Conventions (no NaN): Dice of an empty target with an empty prediction is 1, with any prediction 0;
    HD95 of an empty/non-empty pair is the volume diagonal, of an empty/empty pair 0 (None if not asked).
    """
    return evaluate_each(lambda batch: {"": predict_probs(batch)}, batches, kind, with_hd95).get("", _summary([], None))


def evaluate_each(predict_all: Callable[[Batch], dict[str, torch.Tensor]], batches: Iterable[Batch], kind: LabelKind,
                  with_hd95: bool = True) -> dict[str, dict]:
    """`evaluate` for several predictions of each case made together (one pass over the cases, one case in memory)."""
    dices: dict[str, list] = {}
    hds: dict[str, list] = {}
    for batch in batches:
        ref = foreground(batch["label"].float(), kind)
        for name, probs in predict_all(batch).items():
            pred = foreground(probs.detach().float(), kind)
            dices.setdefault(name, []).append(_dice_per_case(pred, ref))
            if with_hd95:
                hds.setdefault(name, []).append(_hd95_per_case(pred, ref))
    return {name: _summary(dices[name], hds.get(name)) for name in dices}


def _summary(dices: list[torch.Tensor], hds: list[torch.Tensor] | None) -> dict:
    if not dices:
        return {"dice": [], "dice_mean": 0.0, "hd95": 0.0, "n": 0}
    dice = torch.cat(dices).mean(0)
    return {
        "dice": [float(d) for d in dice],
        "dice_mean": float(dice.mean()),
        "hd95": float(torch.cat(hds).mean()) if hds else None,
        "n": int(sum(d.shape[0] for d in dices)),
    }


def expert_predictor(model: ExpertNet, kind: LabelKind, window: Window | None = None) -> Predictor:
    """batch -> probabilities of one expert (eval mode, no grad; sliding windows when a Window is given)."""

    @torch.no_grad()
    def predict(batch: Batch) -> torch.Tensor:
        model.eval()
        return probabilities(model_logits(model, batch, window), kind)

    return predict


def mixture_predictor(experts: Sequence[ExpertNet], gate: GateNet, kind: LabelKind,
                      window: Window | None = None) -> Predictor:
    """batch -> gate-weighted mixture probabilities of the frozen experts: each window mixes the experts'
    log-odds with its case's gate weights."""

    @torch.no_grad()
    def predict(batch: Batch) -> torch.Tensor:
        gate.eval()
        for expert in experts:
            expert.eval()
        if window is None:
            return probabilities(mixture_logits(experts, gate, batch, kind)[0], kind)
        weights = gate_weights(gate, batch)
        presence, clinical = batch["presence"], batch["clinical"]

        def mixed(x: torch.Tensor, i: int) -> torch.Tensor:
            out = 0.0
            for k, expert in enumerate(experts):
                out = out + weights[i, k] * mixing_space(expert(x, presence[i:i + 1], clinical[i:i + 1]), kind)
            return out

        return probabilities(window.infer(mixed, batch["image"]), kind)

    return predict


def mixtures_predictor(experts: Sequence[ExpertNet], gates: Mapping[str, GateNet], kind: LabelKind,
                       window: Window | None = None, alone: Mapping[str, int] | None = None
                       ) -> Callable[[Batch], dict[str, torch.Tensor]]:
    """batch -> {name: probabilities} of a mixture of the same frozen experts per gate, and of single experts
    (alone: name -> expert index), with every expert run once per case: mixing is linear in log-odds, so mixing
    the blended windows equals blending the mixed ones."""

    @torch.no_grad()
    def predict(batch: Batch) -> dict[str, torch.Tensor]:
        scores = expert_logits(experts, batch, kind, window)  # [B, K, R, ...]
        out = {}
        for name, gate in gates.items():
            gate.eval()
            out[name] = probabilities(mixture_logits(experts, gate, batch, kind, cached=scores)[0], kind)
        for name, k in (alone or {}).items():
            out[name] = probabilities(scores[:, k], kind)
        return out

    return predict
