"""A site's work at each protocol step, on its private data; returns only weights and scalars."""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from mome.client.choice import CANDIDATES, anchored, refreshed, site_choice
from mome.client.fedbn import keep_own_norms, with_own_norms
from mome.client.predict import segment_cases
from mome.client.privacy import PrivacyLedger
from mome.common.atomic import write_json
from mome.common.bundle import Bundle, save_bundle
from mome.common.config import Config, Strategy, selector_config
from mome.common.labels import LabelKind
from mome.common.metrics import (Predictor, evaluate, evaluate_each, expert_predictor, mixture_predictor,
                                 mixtures_predictor)
from mome.common.gate import GateNet, gate_weights, load_gate
from mome.common.model import ExpertNet, load_expert, norm_keys
from mome.common.shapley import site_shapley
from mome.common.patches import PatchLoader, Window
from mome.common.cases import SiteData, load_site, split_train_val, to_batches
from mome.common.state import State, state_to_numpy
from mome.common.train import personalise_gate, train_expert, train_gate, train_selector
from mome.common.wire import SHARED_EXPERT, Status

SHAPLEY_CASES = 4  # a modality ranking from a few held-out cases; every further case costs 2^M decoder passes
log = logging.getLogger("mome.site")


@dataclass
class Site:
    """One hospital's data, split once, and where its own models are written."""

    site_id: str
    data: SiteData
    cfg: Config
    out_dir: Path | None
    train_cases: list[dict] = field(default_factory=list)
    val_cases: list[dict] = field(default_factory=list)
    test_cases: list[dict] = field(default_factory=list)  # the labelled held-out cases
    unlabelled: list[dict] = field(default_factory=list)  # held-out cases without labels (segmented at the end)

    @classmethod
    def open(cls, site_dir: Path, cfg: Config, site_id: str = "", out_dir: Path | None = None) -> "Site":
        """Before the federation's plan exists (cfg not planned) the cases are only surveyed, not preprocessed."""
        data = load_site(site_dir, cfg, cache_dir=out_dir / "cache" if out_dir is not None else None)
        train, val = split_train_val(data.train, cfg.val_fraction, cfg.seed)
        return cls(site_id or data.site_id, data, cfg, out_dir, train, val, data.labelled_test, data.unlabelled_test)

    def batches(self, cases: list[dict]) -> list[dict]:
        self._check_planned()
        return to_batches(cases, self.cfg.batch_size, self.data.label_spec, self.cfg.divisor)

    def _check_planned(self) -> None:
        if not self.cfg.planned or any("image" not in c for c in self.train_cases[:1] + self.test_cases[:1]):
            raise RuntimeError("the site's cases were only surveyed (no plan yet): open it with a planned config")

    def patches(self, step: str) -> PatchLoader:
        """Augmented training patches, reshuffled on every pass; augmentation seeded per step."""
        self._check_planned()
        return PatchLoader(self.train_cases, self.cfg, self.data.label_spec, self.cfg.seed + zlib.crc32(step.encode()))

    @property
    def val_batches(self) -> list[dict]:
        return self.batches(self.val_cases)

    @property
    def test_batches(self) -> list[dict]:
        return self.batches(self.test_cases)

    @property
    def window(self) -> Window:
        return Window.from_config(self.cfg)

    @property
    def kind(self) -> LabelKind:
        return self.data.label_spec.kind

    @property
    def counts(self) -> dict[str, int]:
        return {"n_train": len(self.train_cases), "n_val": len(self.val_cases), "n_test": len(self.test_cases),
                "n_unlabelled": len(self.unlabelled)}

    @property
    def privacy(self) -> PrivacyLedger:
        return PrivacyLedger(self.out_dir, self.cfg, self.site_id)

    def _enough(self, cases: list[dict]) -> bool:
        """min-cases: nothing computed from fewer cases leaves the site."""
        return len(cases) >= self.cfg.min_cases

    def _released(self, update: State, sent: State, what: str, step: str, metrics: dict) -> State:
        """The update as it may leave: with differential privacy applied when dp-clip is set."""
        ledger = self.privacy
        if not ledger.enabled:
            return update
        update, spent = ledger.privatise(update, sent, what, step)
        metrics.update(spent)
        return update

    def describe(self) -> dict:
        """Non-private facts the server needs to build models and plan: label spec, modalities, counts, and
        aggregate geometry (medians over the site's cases; none from fewer than min-cases cases)."""
        geometry = self.data.aggregate_geometry() if len(self.data.geometry) >= self.cfg.min_cases else {}
        return {"labels": self.data.label_spec.to_dict(), "modalities": self.data.report.modalities,
                "skipped": len(self.data.report.skipped), "n_gate": len(self.gate_cases), **self.counts, **geometry}

    def expert(self, state: State | None = None) -> ExpertNet:
        return load_expert(self.cfg, self.data.label_spec.n_out, state)

    def gate(self, n_experts: int, state: State | None = None) -> GateNet:
        return load_gate(self.cfg, n_experts, state)

    def train_model(self, state: State, epochs: int, step: str = "") -> tuple[State | None, dict]:
        """Fine-tune a model (shared model or own expert) from the given weights for `epochs` and send the last
        epoch: no epoch is picked on the held-out split, which the gate learns on next (an expert picked there
        looks better to the gate than it is on new cases). No update from fewer than min-cases training cases (the
        reply says so by its `suppressed` flag)."""
        if not self._enough(self.train_cases):
            return None, {**self.counts, "suppressed": 1}
        model = self.expert(self._own_norms(state))
        history = train_expert(model, self.patches(step), self.val_batches, self.cfg, self.kind, epochs=epochs,
                               progress=False, keep_best=False)
        metrics = {"train_loss": history["loss"][-1], **self.counts}
        val = history["val_dice"][-1] if history["val_dice"] else None
        if val is not None and self._enough(self.val_cases):
            metrics["val_dice"] = val
        factors = history["factors"][-1]
        metrics["modality_factors"] = [float(factors[f"factor/{m}"]) for m in self.cfg.modality_names]
        update = state_to_numpy(model)
        if self.cfg.strategy == Strategy.FEDBN:
            update = keep_own_norms(update, state, norm_keys(model), self.out_dir)
        return self._released(update, state, "model", step, metrics), metrics

    def _own_norms(self, state: State) -> State:
        if self.cfg.strategy != Strategy.FEDBN:
            return state
        return with_own_norms(state, norm_keys(self.expert()), self.out_dir)

    @property
    def gate_batches(self) -> list[dict]:
        return self.batches(self.gate_cases)

    @property
    def gate_cases(self) -> list[dict]:
        """The cases the uploaded gate update learns from: the held-out split, cases no expert was fitted to.

        On the training split the site's own expert looks far better than it is on new cases, and a gate trained
        there routes everything to it. A site with fewer than min-cases held out learns on training + validation
        (flag `gate_on_train`); one with fewer than min-cases in all sends no gate update."""
        if self._enough(self.val_cases):
            return self.val_cases
        pooled = self.train_cases + self.val_cases
        return pooled if self._enough(pooled) else []

    @property
    def personal_batches(self) -> list[dict]:
        """Personalisation never leaves the site: the held-out split, else whatever it has."""
        return self.batches(self.val_cases or self.train_cases)

    @property
    def personalise_steps(self) -> int:
        """As many steps as fedavg-ft's local fine-tuning takes: personalise_epochs passes over the train split."""
        return self.cfg.personalise_epochs * -(-len(self.train_cases) // self.cfg.batch_size)

    def train_gate(self, experts: list[State], gate_state: State, batches: list[dict] | None = None,
                   step: str = "", names: list[str] | None = None) -> tuple[State | None, dict]:
        """The gate trained for cfg.gate_steps steps with every expert frozen, on gate_cases (batches: on others,
        for ablations). FedSM's selector instead learns to name the site's own expert (names: the experts' site
        ids), or the shared one where the site has none."""
        on_val = batches is None and self._enough(self.val_cases)
        if batches is None and self.cfg.strategy == Strategy.FEDSM:  # telling sites apart needs no unseen cases
            on_val, batches = False, self.batches(self.train_cases + self.val_cases)
        batches = self.gate_batches if batches is None else batches
        if not batches:
            return None, {**self.counts, "n_gate": 0, "suppressed": 1}
        gate = self.gate(len(experts), gate_state)
        if self.cfg.strategy == Strategy.FEDSM:
            names = names or []
            own = names.index(self.site_id if self.site_id in names else SHARED_EXPERT) if names else 0
            history = train_selector(gate, batches, own, self.cfg)
        else:
            history = train_gate(gate, [self.expert(s) for s in experts], batches, self.cfg, self.kind,
                                 progress=False)
        metrics = {"train_loss": history["mean_loss"], "gate_weights": history["weights"], "n_gate": history["n"],
                   **self.counts, **({} if on_val else {"gate_on_train": 1})}
        return self._released(state_to_numpy(gate), gate_state, "gate", step, metrics), metrics

    def finalise_mixture(self, experts: dict[str, State], gate_state: State) -> tuple[dict, dict]:
        """The last MoME step: personalise the gate, save the site's mixture, then evaluate and segment. FedSM keeps
        the federation's selector, routing each case to one expert."""
        experts = refreshed(self, experts)
        names = list(experts)
        models = [self.expert(experts[n]) for n in names]
        cfg = selector_config(self.cfg)
        gate = load_gate(cfg, len(models), gate_state)
        try:
            personal = gate if self.cfg.strategy == Strategy.FEDSM else personalise_gate(
                gate, models, self.personal_batches, self.cfg, self.kind, self.personalise_steps)
        except Exception:  # the global gate is still a working mixture: keep it rather than nothing
            log.exception("site %s: personalising the gate failed; saving the global gate", self.site_id)
            personal = gate
        personal = anchored(self, personal, names)
        choice = site_choice(self, models, gate, names)
        own = names.index(self.site_id) if choice == "expert" else None
        kept = {"personal": personal, "global": gate}.get(choice)
        if own is not None:
            bundle = Bundle(cfg, self.data.label_spec, {self.site_id: experts[self.site_id]}, None,
                            self.cfg.strategy, self.site_id)
            predict = expert_predictor(models[own], self.kind, self.window)
        else:
            bundle = Bundle(cfg, self.data.label_spec, experts, state_to_numpy(kept), self.cfg.strategy,
                            self.site_id)
            predict = mixture_predictor(models, kept, self.kind, self.window)
        metrics, outcome = self.finalise(bundle, predict,
                                         lambda: self.evaluate_mixture(names, models, gate, personal, choice))
        return {**metrics, **({"final_choice": CANDIDATES.index(choice)} if choice != "personal" else {})}, outcome


    def fine_tuned(self, state: State, epochs: int) -> ExpertNet | None:
        """fedavg-ft's local step: the model fine-tuned on the training split for `epochs` (its last epoch kept), or
        None when that failed (logged: the caller keeps the model it was sent, which still works)."""
        try:
            model = self.expert(state)
            train_expert(model, self.patches("finetune"), self.val_batches, self.cfg, self.kind, epochs=epochs,
                         progress=False, keep_best=False)
        except Exception:
            log.exception("site %s: fine-tuning failed; keeping the model as sent", self.site_id)
            return None
        return model

    def finalise_shared(self, state: State, finetune_epochs: int, strategy: str) -> tuple[dict, dict]:
        """The last step of a shared-model strategy: fine-tune (fedavg-ft), save, then evaluate and segment."""
        state = self._own_norms(state)
        model = self.fine_tuned(state, finetune_epochs) if finetune_epochs > 0 else None
        return self.finalise_model(model if model is not None else self.expert(state), strategy)

    def finalise_model(self, model: ExpertNet, strategy: str) -> tuple[dict, dict]:
        bundle = Bundle(self.cfg, self.data.label_spec, {"shared": state_to_numpy(model)}, None, strategy,
                        self.site_id)
        return self.finalise(bundle, expert_predictor(model, self.kind, self.window),
                             lambda: self.evaluate_model(model))

    def finalise(self, bundle: Bundle, predict_probs: Predictor, evaluate_fn: Callable[[], dict]) -> tuple[dict, dict]:
        """Save the site's final model first; then evaluate where held-out labels exist and segment the unlabelled
        held-out cases. Nothing after the save can lose the model. Returns (metrics, outcome)."""
        metrics = {**self.counts, "model_saved": int(self.save_model(bundle) is not None), **self.privacy.spent()}
        outcome = {"status": Status.NO_LABELS, "reason": self._why_no_metrics()}
        if self.test_cases:
            try:
                scores = _flatten(evaluate_fn())
                if self._enough(self.test_cases):
                    metrics.update(scores)
                    outcome = {"status": Status.EVALUATED, "reason": ""}
                else:  # a score of one or two patients stays at the site
                    outcome = {"status": Status.WITHHELD, "reason": self._withhold(scores)}
            except Exception as exc:  # the full traceback stays in the site's log
                log.exception("site %s: evaluation failed", self.site_id)
                outcome = {"status": Status.EVALUATION_FAILED,
                           "reason": f"evaluation raised {type(exc).__name__} at the site (details in its log)"}
        if self.unlabelled and self.out_dir is not None:
            try:
                metrics["n_segmented"] = len(segment_cases(predict_probs, self.unlabelled, self.data.label_spec,
                                                           self.out_dir / "predictions"))
            except Exception as exc:
                log.exception("site %s: segmenting the unlabelled held-out cases failed", self.site_id)
                outcome["segmentation"] = f"failed: {type(exc).__name__} (details in the site's log)"
        return metrics, outcome

    def _withhold(self, scores: dict) -> str:
        if self.out_dir is not None:
            write_json(self.out_dir / "local_metrics.json", scores)
        return (f"{len(self.test_cases)} labelled held-out case(s), fewer than min-cases {self.cfg.min_cases}: the "
                "scores stay at the site (local_metrics.json)")

    def _why_no_metrics(self) -> str:
        if self.unlabelled:
            return f"{len(self.unlabelled)} held-out case(s), none with a label file in labelsTs/"
        return "the site has no held-out cases (imagesTs/ empty or absent)"

    def evaluate_mixture(self, names: list[str], models: list[ExpertNet], gate: GateNet, personal: GateNet,
                         choice: str = "personal") -> dict:
        """Personalised mixture, global-gate mixture and own expert on the labelled held-out cases; "mixture" is the
        one the site keeps (the personalised one unless it chose another: then also "mixture_personal")."""
        test = self.test_batches
        alone = {"expert": names.index(self.site_id)} if self.site_id in names else {}
        predict = mixtures_predictor(models, {"mixture": personal, "mixture_global": gate}, self.kind, self.window,
                                     alone)
        results = evaluate_each(predict, test, self.kind)
        if choice != "personal":
            results["mixture_personal"] = results["mixture"]
            results["mixture"] = results[{"global": "mixture_global", "expert": "expert"}[choice]]
        if alone:
            results["shapley"] = self._shapley(models[alone["expert"]], test)
        results["gate_weights"] = self._mean_gate_weights(personal, test)
        return results

    def evaluate_model(self, model: ExpertNet) -> dict:
        test = self.test_batches
        return {"model": evaluate(expert_predictor(model, self.kind, self.window), test, self.kind),
                "shapley": self._shapley(model, test)}

    def _shapley(self, model: ExpertNet, test: list[dict]) -> list[float]:
        """Mean Shapley value per modality (imaging ones, then clinical) over the first SHAPLEY_CASES held-out
        cases (2^M forwards each: the most expensive part of a site's final step)."""
        first = [b for i, b in enumerate(test) if i * self.cfg.batch_size < SHAPLEY_CASES]
        values = site_shapley(model, [self._central(b) for b in first], self.kind, self.cfg.modality_names)["shapley"]
        return [values[m] for m in (*self.cfg.modality_names, "clinical")]

    def _central(self, batch: dict) -> dict:
        """The batch cropped to its central inference window: Shapley's 2^M forwards run without sliding windows."""
        shape = batch["image"].shape[2:]
        roi = self.window.roi(shape)
        if all(r >= s for r, s in zip(roi, shape)):
            return batch
        starts = [(s - min(r, s)) // 2 for r, s in zip(roi, shape)]
        crop = tuple(slice(a, a + min(r, s)) for a, r, s in zip(starts, roi, shape))
        return {k: v[(..., *crop)] if k in ("image", "label") else v for k, v in batch.items()}

    @torch.no_grad()
    def _mean_gate_weights(self, gate: GateNet, test: list[dict]) -> list[float]:
        weights = [gate_weights(gate, b) for b in test]
        return torch.cat(weights).mean(0).tolist() if weights else []

    def save_model(self, bundle: Bundle) -> Path | None:
        """The site's final model, at <out-dir>/model (atomically); None when the site has no out-dir."""
        if self.out_dir is None:
            return None
        return save_bundle(bundle, self.out_dir / "model")


def _flatten(results: dict) -> dict:
    """{'mixture': {'dice': [...], 'dice_mean': x}} -> {'mixture.dice': [...], ...} scalars/lists only."""
    flat = {}
    for name, value in results.items():
        if isinstance(value, dict):
            flat.update({f"{name}.{k}": v for k, v in value.items() if v is not None and k != "n"})
        else:
            flat[name] = value
    return flat
