"""`mome bench`: every strategy on several synthetic presets and seeds; each site's final model is scored case by case
on the site's labelled held-out cases, so that bench_report can pair strategies case by case and seed by seed."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from mome.client.adapt import adapt
from mome.client.predict import predictor
from mome.client.site import Site
from mome.common.atomic import write_json
from mome.common.bundle import load_bundle
from mome.common.config import Config, Strategy, config_from_mapping
from mome.common.metrics import Predictor, dice_per_case
from mome.common.wire import site_id_from_name
from mome.sim.run_sim import DEMO_BUDGET, run_all
from mome.sim.synth import generate_federation, generate_site, preset_sites, site_traits

log = logging.getLogger("mome.bench")

# presets that differ in what makes sites differ: a mix of everything, nothing, few cases, a missing sequence
BENCH_PRESETS = ("mixed", "iid", "few-shot", "missing-modality")
# FLamby's ensemble of the sites' local models (each site averages every site's local model): scored from the
# models the `local` strategy saved, so it costs no training of its own
LOCAL_ENSEMBLE = "local-ensemble"


@dataclass(frozen=True)
class BenchPlan:
    presets: tuple[str, ...] = BENCH_PRESETS
    seeds: tuple[int, ...] = (0, 1, 2)
    strategies: tuple[str, ...] = tuple(Strategy)
    sites: int = 4
    cases: int | None = None  # training cases per (non few-shot) site; None: the preset's own
    overrides: dict = field(default_factory=lambda: dict(DEMO_BUDGET))  # run-config keys (kebab-case)
    late_join: bool = True  # also the hospital that joins late (`mome adapt`), per run

    def config(self, seed: int) -> Config:
        return config_from_mapping({**self.overrides, "seed": seed})


def run_bench(plan: BenchPlan, out: Path) -> dict[str, dict[int, dict]]:
    """{preset: {seed: scored run}}; a run whose scores were stored with the same config is read, not repeated."""
    results: dict[str, dict[int, dict]] = {}
    total, done = len(plan.presets) * len(plan.seeds), 0
    for preset in plan.presets:
        for seed in plan.seeds:
            done += 1
            log.info("bench run %d/%d: preset %s, seed %d", done, total, preset, seed)
            results.setdefault(preset, {})[seed] = _scored_run(plan, preset, seed, out / preset / f"seed-{seed}")
    return results


def _scored_run(plan: BenchPlan, preset: str, seed: int, run_dir: Path) -> dict:
    cfg = plan.config(seed)
    stamp = {"config": cfg.to_dict(), "strategies": list(plan.strategies), "sites": plan.sites, "cases": plan.cases}
    path = run_dir / "case_scores.json"
    if path.exists():
        stored = json.loads(path.read_text())
        if stored.get("stamp") == stamp:
            log.info("%s: already scored with this config, reused", run_dir)
            if not stored.get("late_join") and plan.late_join:  # stored by --no-late-join: add it, keep the rest
                stored["late_join"] = late_join(plan, preset, seed, run_dir)
                write_json(path, stored)
            return stored
    site_dirs = generate_federation(run_dir / "data", sites=plan.sites, preset=preset, seed=seed, size=cfg.size,
                                    cases=plan.cases)
    combined = run_all([Strategy(s) for s in plan.strategies], site_dirs, cfg, run_dir)
    scored = {"stamp": stamp, "preset": preset, "seed": seed,
              "traits": {site_id_from_name(d.name): site_traits(d) for d in site_dirs},
              "cost": {s: _cost(m) for s, m in combined["strategies"].items()},
              "scores": score_run(run_dir, site_dirs, plan.strategies)}
    scored["late_join"] = late_join(plan, preset, seed, run_dir) if plan.late_join else {}
    write_json(path, scored)
    return scored


def _cost(metrics: dict) -> dict:
    sites = metrics.get("sites", {}).values()
    return {"wall_time_s": metrics.get("wall_time_s", 0.0),
            "bytes": sum(e.get("bytes_up", 0) + e.get("bytes_down", 0) for e in sites)}


def score_run(run_dir: Path, site_dirs: list[Path], strategies: tuple[str, ...]) -> dict[str, dict[str, list]]:
    """{strategy: {site: per-case Dice per region, or None where the site kept no model}} on each site's labelled
    held-out cases, with the model the site ended with (MoME: its personalised mixture)."""
    site_ids = [site_id_from_name(d.name) for d in site_dirs]
    bundles = {s: {site: _bundle(run_dir / s / "sites" / site / "model") for site in site_ids} for s in strategies}
    ensemble = None
    if Strategy.LOCAL in strategies and all(bundles[Strategy.LOCAL].values()):
        bundles[LOCAL_ENSEMBLE] = {site: LOCAL_ENSEMBLE for site in site_ids}
        ensemble = _ensemble(bundles[Strategy.LOCAL].values())  # the same models at every site: built once
    scores: dict[str, dict[str, list]] = {s: {} for s in bundles}
    for site_dir, site in zip(site_dirs, site_ids):
        kept = {s: b[site] for s, b in bundles.items() if b[site] is not None}
        for s in set(bundles) - set(kept):
            scores[s][site] = None
        predictors = {s: ensemble if b == LOCAL_ENSEMBLE else predictor(b)
                      for s, b in kept.items()}
        if predictors:
            reference = next(b for b in kept.values() if b != LOCAL_ENSEMBLE)
            for s, per_case in score_site(site_dir, reference.cfg, predictors).items():
                scores[s][site] = per_case
    return scores


def score_site(site_dir: Path, cfg: Config, predictors: dict[str, Predictor]) -> dict[str, list]:
    """Per-case Dice per region of each predictor on the site's labelled held-out cases."""
    site = Site.open(site_dir, cfg)
    out = {}
    for name, predict in predictors.items():
        with torch.no_grad():
            per_case = [dice_per_case(predict(batch), batch["label"], site.kind) for batch in site.test_batches]
        out[name] = torch.cat(per_case).tolist() if per_case else []
    return out


LATE_CASES = 5  # labelled cases of the hospital that joins late


def late_join(plan: BenchPlan, preset: str, seed: int, run_dir: Path) -> dict:
    """A hospital that took no part: the preset's next site (a scanner and convention of its own) with LATE_CASES
    labelled cases adapts what the federation distributed (`mome adapt`: MoME's global mixture personalises its
    gate; FedAvg's model is fine-tuned as fedavg-ft would) and is scored on its held-out cases."""
    spec = replace(preset_sites(preset, plan.sites + 1, plan.cases)[-1], n_train=LATE_CASES)
    site_dir = generate_site(spec, run_dir / "late", plan.config(seed).size, seed)
    scored = {"traits": site_traits(site_dir), "cases": LATE_CASES, "scores": {}}
    for strategy in (Strategy.MOME, Strategy.FEDAVG):
        given = run_dir / strategy / "model"
        if strategy not in plan.strategies or not (given / "metadata.json").exists():
            continue
        out = run_dir / "late-join" / strategy
        adapt(given, site_dir, out)
        bundles = {f"{strategy}-adapted": load_bundle(out / "model"), f"{strategy}-given": load_bundle(given)}
        scored["scores"] |= score_site(site_dir, bundles[f"{strategy}-given"].cfg,
                                       {name: predictor(b) for name, b in bundles.items()})
    return scored


def _bundle(folder: Path):
    return load_bundle(folder) if (folder / "metadata.json").exists() else None


def _ensemble(bundles) -> Predictor:
    members = [predictor(b) for b in bundles]
    return lambda batch: torch.stack([p(batch) for p in members]).mean(0)
