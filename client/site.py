"""A site's work at each protocol step, on its private data; returns only weights and scalars."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from common.bundle import Bundle, save_bundle
from common.clinical import parse_schema
from common.config import Config
from common.metrics import evaluate, expert_predictor, mixture_predictor
from common.model import ExpertNet, GateNet, build_expert, build_gate, gate_weights
from common.shapley import site_shapley
from common.sitedata import SiteData, load_site, split_train_val, to_batches
from common.state import load_numpy_state, state_to_numpy
from common.train import personalise_gate, train_expert, train_gate

State = dict[str, np.ndarray]


@dataclass
class Site:
    """One hospital's data, split once, and where its own models are written."""

    site_id: str
    data: SiteData
    cfg: Config
    out_dir: Path | None
    train: list[dict] = field(default_factory=list)
    val: list[dict] = field(default_factory=list)
    test: list[dict] = field(default_factory=list)

    @classmethod
    def open(cls, site_dir: Path, cfg: Config, site_id: str = "", out_dir: Path | None = None) -> "Site":
        data = load_site(site_dir, cfg)
        train, val = split_train_val(data.train, cfg.val_fraction, cfg.seed)
        return cls(site_id or data.site_id, data, cfg, out_dir, to_batches(train, cfg.batch_size),
                   to_batches(val, cfg.batch_size), to_batches(data.test, cfg.batch_size))

    @property
    def kind(self) -> str:
        return self.data.label_spec.kind

    @property
    def counts(self) -> dict[str, int]:
        n = lambda batches: sum(int(b["image"].shape[0]) for b in batches)  # noqa: E731
        return {"n_train": n(self.train), "n_val": n(self.val), "n_test": n(self.test)}

    def describe(self) -> dict:
        """Non-private facts the server needs to build models: label spec, modalities, counts."""
        return {"labels": self.data.label_spec.to_dict(), "modalities": self.data.report.modalities,
                "skipped": len(self.data.report.skipped), **self.counts}

    def expert(self, state: State | None = None) -> ExpertNet:
        n_clinical = parse_schema(self.cfg.clinical_fields).width
        model = build_expert(self.cfg, n_clinical, self.data.label_spec.n_out)
        if state is not None:
            load_numpy_state(model, state)
        return model

    def gate(self, n_experts: int, state: State | None = None) -> GateNet:
        gate = build_gate(self.cfg, parse_schema(self.cfg.clinical_fields).width, n_experts)
        if state is not None:
            load_numpy_state(gate, state)
        return gate

    def train_model(self, state: State, epochs: int) -> tuple[State, dict]:
        """Fine-tune a model (shared model or own expert) from the given weights."""
        model = self.expert(state)
        history = train_expert(model, self.train, self.val, self.cfg, self.kind, epochs=epochs, progress=False)
        metrics = {"train_loss": history["loss"][-1], **self.counts}
        if history.get("best_val_dice") is not None:
            metrics["val_dice"] = history["best_val_dice"]
        factors = history["factors"][-1]
        metrics["modality_factors"] = [float(factors[f"factor/{m}"]) for m in self.cfg.modality_names]
        return state_to_numpy(model), metrics

    @property
    def gate_cases(self) -> list[dict]:
        """The gate learns which expert to trust on cases no expert was fitted to: the held-out split.

        On the training split the site's own expert looks far better than it is on new cases, and a gate trained
        there routes everything to it. Only a site too small to hold any case out falls back to its training split."""
        return self.val or self.train

    @property
    def personalise_steps(self) -> int:
        """As many steps as fedavg-ft's local fine-tuning takes: personalise_epochs passes over the train split."""
        return self.cfg.personalise_epochs * len(self.train)

    def train_gate(self, experts: list[State], gate_state: State) -> tuple[State, dict]:
        """The gate trained for cfg.gate_steps steps on the held-out split, with every expert frozen."""
        models = [self.expert(s) for s in experts]
        gate = self.gate(len(models), gate_state)
        history = train_gate(gate, models, self.gate_cases, self.cfg, self.kind, progress=False)
        return state_to_numpy(gate), {"train_loss": history["mean_loss"], "gate_weights": history["weights"],
                                      "n_gate": history["n"], **self.counts}

    def evaluate_mixture(self, experts: dict[str, State], gate_state: State) -> dict:
        """Own expert, the global-gate mixture and the personalised mixture on held-out cases."""
        names = list(experts)
        models = [self.expert(experts[n]) for n in names]
        gate = self.gate(len(models), gate_state)
        personal = personalise_gate(gate, models, self.gate_cases, self.cfg, self.kind, self.personalise_steps)
        own = models[names.index(self.site_id)] if self.site_id in names else None
        results = {"mixture": evaluate(mixture_predictor(models, personal, self.kind), self.test, self.kind),
                   "mixture_global": evaluate(mixture_predictor(models, gate, self.kind), self.test, self.kind)}
        if own is not None:
            results["expert"] = evaluate(expert_predictor(own, self.kind), self.test, self.kind)
            results["shapley"] = self._shapley(own)
        results["gate_weights"] = self._mean_gate_weights(personal)
        self._save(Bundle(self.cfg, self.data.label_spec, experts, state_to_numpy(personal), "mome",
                          self.site_id))
        return _flatten(results, self.counts)

    def evaluate_shared(self, state: State, finetune_epochs: int, strategy: str) -> dict:
        model = self.expert(state)
        if finetune_epochs > 0:
            train_expert(model, self.train, self.val, self.cfg, self.kind, epochs=finetune_epochs, progress=False)
        results = {"model": evaluate(expert_predictor(model, self.kind), self.test, self.kind),
                   "shapley": self._shapley(model)}
        self._save(Bundle(self.cfg, self.data.label_spec, {"shared": state_to_numpy(model)}, None, strategy,
                          self.site_id))
        return _flatten(results, self.counts)

    def _shapley(self, model: ExpertNet) -> list[float]:
        """Mean Shapley value per modality (imaging ones, then clinical) over held-out cases."""
        values = site_shapley(model, self.test, self.kind, self.cfg.modality_names)["shapley"]
        return [values[m] for m in (*self.cfg.modality_names, "clinical")]

    @torch.no_grad()
    def _mean_gate_weights(self, gate: GateNet) -> list[float]:
        weights = [gate_weights(gate, b) for b in self.test]
        return torch.cat(weights).mean(0).tolist() if weights else []

    def _save(self, bundle: Bundle) -> None:
        if self.out_dir is not None:
            save_bundle(bundle, self.out_dir / "model")


def _flatten(results: dict, counts: dict) -> dict:
    """{'mixture': {'dice': [...], 'dice_mean': x}} -> {'mixture.dice': [...], ...} scalars/lists only."""
    flat = dict(counts)
    for name, value in results.items():
        if isinstance(value, dict):
            flat.update({f"{name}.{k}": v for k, v in value.items() if v is not None and k != "n"})
        else:
            flat[name] = value
    return flat
