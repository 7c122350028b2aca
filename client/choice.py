"""A site's last word on the model it keeps: its own slot refreshed from the final shared model
(`refresh-own-expert`), a floor on that slot's weight in its kept gate (`own-prior-cases`), and
(`final-mixture=validated`) its personalised mixture, the federation's global-gate mixture or its own expert, chosen
on its own validation cases.

The personalised gate is fitted on those same cases, so its score is taken out of fold (each case scored by a gate
personalised on the other folds); the global gate and the site's own expert were never fitted to them. With 1-3
cases any score is noisy, so the rule leans on the default: another candidate replaces the personalised mixture only
when it scores higher on average and on more than half of the cases (with one case: on that case)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Sequence

import torch

from mome.common.cases import to_batches
from mome.common.config import Config, Strategy
from mome.common.labels import LabelKind
from mome.common.metrics import dice_per_case
from mome.common.gate import GateNet
from mome.common.model import ExpertNet, expert_logits, mixture_logits, probabilities
from mome.common.patches import Window
from mome.common.state import state_to_numpy
from mome.common.train import personalise_gate
from mome.common.wire import SHARED_EXPERT

if TYPE_CHECKING:
    from mome.client.site import Site

log = logging.getLogger("mome.client")
CANDIDATES = ("personal", "global", "expert")
MAX_FOLDS = 5  # personalisations per choice: a large validation split is scored in folds, not case by case


def choose_final(experts: Sequence[ExpertNet], gate: GateNet, cases: Sequence[dict], cfg: Config, kind: LabelKind,
                 steps: int, own: int | None) -> tuple[str, dict[str, float]]:
    """(the chosen candidate, mean validation Dice per candidate); `cases` are one-case batches with labels, `own`
    the index of the site's expert (None: it has none)."""
    if not cases:
        return "personal", {}
    window = Window.from_config(cfg)
    logits = [expert_logits(experts, case, kind, window) for case in cases]
    folds = [list(range(k, len(cases), min(len(cases), MAX_FOLDS))) for k in range(min(len(cases), MAX_FOLDS))]
    scores: dict[str, list[float]] = {name: [] for name in CANDIDATES if name != "expert" or own is not None}
    for fold in folds:
        rest = [case for i, case in enumerate(cases) if i not in fold]
        personal = personalise_gate(gate, experts, rest, cfg, kind, steps) if rest else gate  # trains: with grads
        with torch.no_grad():
            for i in fold:
                label = cases[i]["label"]
                for name, g in (("personal", personal), ("global", gate)):
                    mixed, _ = mixture_logits(experts, g, cases[i], kind, cached=logits[i])
                    scores[name].append(_dice(probabilities(mixed, kind), label, kind))
                if own is not None:
                    scores["expert"].append(_dice(probabilities(logits[i][:, own], kind), label, kind))
    return pick(scores), {name: sum(v) / len(v) for name, v in scores.items()}


def pick(scores: dict[str, list[float]]) -> str:
    """The rule: the personalised mixture, unless another candidate beats it on the mean and on more than half of
    the cases (the best such one)."""
    means = {name: sum(v) / len(v) for name, v in scores.items()}
    best = "personal"
    for name, values in scores.items():
        wins = sum(a > b for a, b in zip(values, scores["personal"]))
        if means[name] > means[best] and wins * 2 > len(values):
            best = name
    return best


def _dice(probs: torch.Tensor, label: torch.Tensor, kind: LabelKind) -> float:
    return float(dice_per_case(probs, label, kind).mean())


def refreshed(site: "Site", experts: dict[str, dict]) -> dict[str, dict]:
    """refresh-own-expert: the site's own expert in its final mixture is the federation's final shared model
    fine-tuned on its training cases for personalise-epochs, the step fedavg-ft takes (it never leaves the site).
    If that fails the site keeps the expert it sent."""
    if not (site.cfg.refresh_own_expert and site.site_id in experts and SHARED_EXPERT in experts):
        return experts
    model = site.fine_tuned(experts[SHARED_EXPERT], site.cfg.personalise_epochs)
    return experts if model is None else {**experts, site.site_id: state_to_numpy(model)}


def anchored(site: "Site", gate: GateNet, names: list[str]) -> GateNet:
    """MoME's kept gate gives the site's own expert (refreshed: fedavg-ft's model) a floor worth own-prior-cases
    cases against the n its routing was personalised on: half the weight after one case, ~5 % after twenty. A gate
    tuned on one or two cases is a guess; the site's own fine-tuned model is the safe default it leans on."""
    prior = site.cfg.own_prior_cases
    if site.cfg.strategy != Strategy.MOME or prior <= 0 or site.site_id not in names:
        return gate
    tuned_on = len(site.val_cases or site.train_cases)
    return gate.anchored(names.index(site.site_id), prior / (prior + tuned_on))


def site_choice(site: "Site", models: Sequence[ExpertNet], gate: GateNet, names: list[str]) -> str:
    """What the site keeps: "personal" unless final-mixture=validated (MoME, with validation cases) says otherwise."""
    if site.cfg.final_mixture != "validated" or site.cfg.strategy != Strategy.MOME or not site.val_cases:
        return "personal"
    try:
        cases = to_batches(site.val_cases, 1, site.data.label_spec, site.cfg.divisor)
        own = names.index(site.site_id) if site.site_id in names else None
        choice, means = choose_final(models, gate, cases, site.cfg, site.kind, site.personalise_steps, own)
    except Exception:  # the personalised mixture is the default; a failed choice must not cost the model
        log.exception("site %s: choosing the final mixture failed; keeping the personalised one", site.site_id)
        return "personal"
    log.info("site %s: final mixture %s (validation Dice %s)", site.site_id, choice,
             ", ".join(f"{k} {v:.3f}" for k, v in means.items()))
    return choice
