"""Training loops: a modality-balanced expert, the gate over frozen experts, and local gate personalisation."""

from __future__ import annotations

import copy
import time
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceFocalLoss
from torch import nn
from tqdm.auto import tqdm

from mome.common.balance import ModalityBalancer, aux_scores
from mome.common.config import Config
from mome.common.labels import LabelKind
from mome.common.metrics import evaluate, expert_predictor
from mome.common.gate import GateNet
from mome.common.model import ExpertNet, drop_modalities, expert_logits, mixture_logits
from mome.common.patches import Window

Batch = Mapping[str, torch.Tensor]
# frozen experts' outputs cached across gate steps only below this size; above it they are recomputed per step
CACHE_LIMIT_BYTES = 512 * 2**20
# the per-modality aux losses are taken on 2x average-pooled logits and labels: they only rank the modalities and
# keep each stem informative, and at full resolution they cost about a fifth of a training step on CPU
AUX_POOL = 2


def segmentation_loss(kind: LabelKind) -> nn.Module:
    """Dice + voxel loss on logits: sigmoid focal for nested regions, softmax CE for exclusive classes."""
    if LabelKind(kind) is LabelKind.REGIONS:
        # not DiceCELoss: with more than one channel it applies softmax CE, wrong for overlapping regions
        return DiceFocalLoss(sigmoid=True, gamma=2.0)
    return DiceCELoss(softmax=True)


def _order(n: int, generator: torch.Generator) -> list[int]:
    return torch.randperm(n, generator=generator).tolist()


def _cases(batches: Sequence[Batch]) -> int:
    return int(sum(b["label"].shape[0] for b in batches))


def _expert_loss(model: ExpertNet, batch: Batch, presence: torch.Tensor, loss_fn, factors, cfg: Config,
                 kind: LabelKind):
    """Main loss on the (dropped-out) presence + factor-weighted per-modality aux losses + clinical aux loss."""
    label, m_count = batch["label"], model.n_modalities
    feats = model.stem_features(batch["image"])
    loss = loss_fn(model.decode(feats, presence, batch["clinical"]), label)
    aux, aux_label = model.aux_logits(feats), label
    if all(s % AUX_POOL == 0 for s in label.shape[2:]):
        aux = F.avg_pool3d(aux.flatten(1, 2), AUX_POOL).unflatten(1, aux.shape[1:3])
        aux_label = F.avg_pool3d(label, AUX_POOL)  # soft labels: each pooled voxel's foreground fraction
    # aux heads see the modalities the case really has (dropout only hides them from the fused body)
    present = batch["presence"][:, :m_count]
    terms = []
    for m, logits in enumerate(aux.unbind(1)):
        rows = present[:, m] > 0
        if bool(rows.all()):
            terms.append(factors[m] * loss_fn(logits, aux_label))
        elif bool(rows.any()):
            terms.append(factors[m] * loss_fn(logits[rows], aux_label[rows]))
    rows = batch["presence"][:, m_count] > 0
    if rows.any():
        fraction = label[rows].flatten(2).mean(2)  # the clinical head guesses each channel's volume fraction
        logits = model.clinical_logits(batch["clinical"][rows], batch["presence"][rows])
        terms.append(F.binary_cross_entropy_with_logits(logits, fraction))
    if terms:
        loss = loss + cfg.aux_weight * torch.stack(terms).mean()
    return loss, aux_scores(aux, aux_label, present, kind)


def _poly_schedule(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """nnU-Net's poly decay, lr x (1 - step/steps)^0.9, over one training call's optimiser steps."""
    return torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=max(steps, 1), power=0.9)


def _validate(model: ExpertNet, val_batches: Sequence[Batch], kind: LabelKind, cfg: Config) -> float | None:
    if not val_batches:
        return None
    predict = expert_predictor(model, kind, Window.from_config(cfg))
    return evaluate(predict, val_batches, kind, with_hd95=False)["dice_mean"]


def train_expert(
    model: ExpertNet,
    train_batches: Iterable[Batch],
    val_batches: Sequence[Batch],
    cfg: Config,
    kind: LabelKind,
    epochs: int | None = None,
    progress: bool = True,
    keep_best: bool = True,
) -> dict:
    """Train in place; the model ends with the state of best validation Dice (the last one without val data, or
    with keep_best False: validation is then only reported, so the val cases stay unbiased for what learns on them).

    train_batches: re-iterable, one pass per epoch (a PatchLoader: shuffled augmented patches; or a list)."""
    names = cfg.modality_names
    if len(names) != model.n_modalities:
        raise ValueError(f"config has {len(names)} modalities {names}, model has {model.n_modalities}")
    epochs = cfg.expert_epochs if epochs is None else epochs
    generator = torch.Generator().manual_seed(cfg.seed)
    balancer = ModalityBalancer(names, alpha=cfg.balance_alpha)
    loss_fn = segmentation_loss(kind)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    scheduler = _poly_schedule(optimizer, epochs * len(train_batches)) if cfg.lr_decay else None
    history: dict = {"loss": [], "val_dice": [], "factors": [], "seconds": [], "n_train": getattr(train_batches, "n_cases", None) or _cases(train_batches)}
    best_dice, best_state, best_epoch = -1.0, None, epochs - 1
    for epoch in range(epochs):
        start, model_losses = time.perf_counter(), []
        model.train()
        bar = tqdm(train_batches, desc=f"expert {epoch + 1}/{epochs}", disable=not progress, leave=False)
        for batch in bar:
            presence = drop_modalities(batch["presence"], model.n_modalities, cfg.modality_dropout, generator)
            loss, scores = _expert_loss(model, batch, presence, loss_fn, balancer.factors.tolist(), cfg, kind)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            balancer.scale_gradients(model.stems)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            balancer.update(scores)
            model_losses.append(loss.item())
            bar.set_postfix(loss=f"{model_losses[-1]:.3f}")
        val = _validate(model, val_batches, kind, cfg) if keep_best or epoch == epochs - 1 else None
        history["loss"].append(sum(model_losses) / len(model_losses) if model_losses else None)
        history["val_dice"].append(val)
        history["factors"].append(balancer.log_epoch())
        history["seconds"].append(time.perf_counter() - start)
        if keep_best and val is not None and val > best_dice:
            best_dice, best_epoch = val, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    history.update(best_epoch=best_epoch, best_val_dice=best_dice if best_state is not None else None)
    return history


def _expert_cache(experts, batches, kind, window: Window) -> list[torch.Tensor] | None:
    """Frozen experts give the same outputs every step: compute them once when they fit in memory."""
    size = sum(b["label"][:, :1].numel() for b in batches) * len(experts) * batches[0]["label"].shape[1] * 4
    if size > CACHE_LIMIT_BYTES:
        return None
    return [expert_logits(experts, b, kind, window) for b in batches]


def _gate_optimizer(gate: GateNet, cfg: Config) -> torch.optim.Optimizer:
    """The output bias takes its own, larger lr (gate rounds and personalisation alike). A site's labelling
    convention is the same for all its cases, so much of what it asks of the gate is a shift of that bias; Adam
    moves a weight by at most about lr per step, and a few-shot site personalises for only a few steps."""
    prior = gate.prior
    rest = [p for p in gate.parameters() if p is not prior]
    return torch.optim.AdamW([{"params": rest, "lr": cfg.lr}, {"params": [prior], "lr": cfg.gate_prior_lr}])


def train_gate(
    gate: GateNet,
    experts: Sequence[ExpertNet],
    batches: Sequence[Batch],
    cfg: Config,
    kind: LabelKind,
    steps: int | None = None,
    progress: bool = True,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict:
    """Train the gate in place on the mixture of frozen experts for a number of optimiser steps.

    Steps, not epochs: the gate learns on a site's held-out split, a handful of cases, so its budget is set
    apart from how many cases there are; the batches are visited in a fresh random order on every pass.
    history["mean_loss"] and history["weights"] are over the last pass (at most one visit per batch)."""
    steps = cfg.gate_steps if steps is None else steps
    history: dict = {"loss": [], "mean_loss": None, "weights": None, "n": _cases(batches), "steps": 0}
    if not batches or steps <= 0:
        return history
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = optimizer or _gate_optimizer(gate, cfg)
    window = Window.from_config(cfg)
    cache = _expert_cache(experts, batches, kind, window)
    loss_fn = segmentation_loss(kind)  # the experts' own loss, on the mixture's logits
    order = [i for _ in range(-(-steps // len(batches))) for i in _order(len(batches), generator)][:steps]
    gate.train()
    seen = []  # gate weights per step
    for i in tqdm(order, desc="gate", disable=not progress, leave=False):
        cached = cache[i] if cache is not None else None
        logits, weights = mixture_logits(experts, gate, batches[i], kind, cached=cached, window=window)
        loss = loss_fn(logits, batches[i]["label"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history["loss"].append(loss.item())
        seen.append(weights.detach())
    last_loss, last_weights = history["loss"][-len(batches):], torch.cat(seen[-len(batches):])
    sizes = [w.shape[0] for w in seen[-len(batches):]]
    history.update(mean_loss=sum(loss * n for loss, n in zip(last_loss, sizes)) / sum(sizes),
                   weights=last_weights.mean(0).tolist(), steps=len(order))
    gate.eval()
    return history


def train_selector(gate: GateNet, batches: Sequence[Batch], own: int, cfg: Config, steps: int | None = None) -> dict:
    """FedSM's selector: the gate trained in place as a classifier of which site a case comes from (every case of
    this site is labelled `own`, the index of its expert), with no expert output involved."""
    steps = cfg.gate_steps if steps is None else steps
    history: dict = {"mean_loss": None, "weights": None, "n": _cases(batches), "steps": 0}
    if not batches or steps <= 0:
        return history
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = _gate_optimizer(gate, cfg)
    order = [i for _ in range(-(-steps // len(batches))) for i in _order(len(batches), generator)][:steps]
    gate.train()
    losses, seen = [], []
    for i in order:
        batch = batches[i]
        summary = batch["summary"] if "summary" in batch else batch["image"]
        logits = gate.logits(summary, batch["presence"], batch["clinical"], batch["stats"])
        loss = F.cross_entropy(logits, torch.full((logits.shape[0],), own, dtype=torch.long))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        seen.append(torch.softmax(logits.detach(), 1))
    last = seen[-len(batches):]
    history.update(mean_loss=sum(losses[-len(batches):]) / len(last), weights=torch.cat(last).mean(0).tolist(),
                   steps=len(order))
    gate.eval()
    return history


def personalise_gate(
    gate: GateNet, experts: Sequence[ExpertNet], batches: Sequence[Batch], cfg: Config, kind: LabelKind, steps: int,
    progress: bool = False,
) -> GateNet:
    """A copy of the gate fine-tuned on local batches for `steps` steps; the original is untouched.

    personalise=prior (the default) fits only the gate's output bias, its case-independent trust in each expert, at
    personal-prior-lr. A site personalises on a handful of cases: the thousands of weights of the per-case routing,
    fitted to three cases, carry whatever the global gate they started from got wrong or right into what the site
    keeps (docs/bench/gate-path.md: along the path between two global gates a site kept 0.015 of Dice difference
    with the whole gate fitted, 0.006 with the prior), where K numbers are what three cases can set. The per-case
    routing stays the federation's, learnt on every site's held-out cases."""
    local = copy.deepcopy(gate)
    optimizer = None
    if cfg.personalise == "prior":
        for parameter in local.parameters():
            parameter.requires_grad_(parameter is local.prior)
        optimizer = torch.optim.AdamW([local.prior], lr=cfg.personal_prior_lr)
    train_gate(local, experts, batches, cfg, kind, steps=steps, progress=progress, optimizer=optimizer)
    local.requires_grad_(True)
    return local
