"""Which cases should the gate learn on? The validation split (what MoME does) against train + validation.

Every site's expert was fitted to its own training split, so on those cases it looks better than it is on new
ones; a gate trained there may learn to route each site to its own expert. This runs the MoME protocol without
Flower, through the same site steps and server aggregation the federation uses (FedAvg warm-up, one expert per
site, gate rounds, local personalisation) with the default config, once, then trains the gate both ways from the
same experts and reports held-out mean Dice per site.

    python benchmarks/bench_gate_split.py [--data DIR] [--test-cases 20] [--seed 0]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from mome.client.site import Site
from mome.common.config import Config
from mome.common.metrics import evaluate, expert_predictor, mixture_predictor
from mome.common.sitedata import find_site_dirs
from mome.sim.run_sim import local_plan
from mome.common.state import state_to_numpy
from mome.common.train import personalise_gate
from mome.server.aggregate import aggregate
from mome.sim.synth import generate_federation

Split = Callable[[Site], list[dict]]
SPLITS: dict[str, Split] = {"val (MoME)": lambda s: s.val_batches,
                            "train+val": lambda s: s.batches(s.train_cases + s.val_cases)}


def experts_from_warmup(sites: list[Site], cfg: Config) -> dict[str, dict]:
    base = state_to_numpy(sites[0].expert())
    for _ in range(cfg.warmup_rounds):
        replies = [s.train_model(base, cfg.warmup_epochs) for s in sites]
        base, _ = aggregate([state for state, _ in replies], [m["n_train"] for _, m in replies],
                            [m["train_loss"] for _, m in replies])
    return {s.site_id: s.train_model(base, cfg.expert_epochs)[0] for s in sites}


def gate_results(sites: list[Site], experts: dict[str, dict], cfg: Config, split: Split) -> dict[str, dict]:
    """Gate rounds as the server runs them (Site.train_gate, aggregated by case counts), then personalisation."""
    names = list(experts)
    gate = state_to_numpy(sites[0].gate(len(names)))
    for _ in range(cfg.gate_rounds):
        replies = [site.train_gate([experts[n] for n in names], gate, split(site)) for site in sites]
        gate, _ = aggregate([state for state, _ in replies], [m["n_gate"] for _, m in replies],
                            [m["train_loss"] for _, m in replies], cfg.gate_aggregation, cfg.dro_temperature)
    results = {}
    for site in sites:
        models = [site.expert(experts[n]) for n in names]
        global_gate = site.gate(len(names), gate)
        personal = personalise_gate(global_gate, models, split(site), cfg, site.kind, site.personalise_steps)
        results[site.site_id] = {
            "personalised": evaluate(mixture_predictor(models, personal, site.kind), site.test_batches, site.kind,
                                     with_hd95=False)["dice_mean"],
            "global gate": evaluate(mixture_predictor(models, global_gate, site.kind), site.test_batches, site.kind,
                                    with_hd95=False)["dice_mean"]}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="site folders (default: the mixed preset, generated into a temp folder)")
    parser.add_argument("--test-cases", type=int, default=20, help="held-out cases per generated site")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cfg = Config(seed=args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        dirs = (find_site_dirs(args.data) if args.data else
                generate_federation(Path(tmp), seed=args.seed, size=cfg.size, test_cases=args.test_cases))
        cfg = local_plan(cfg, dirs)
        sites = [Site.open(d, cfg) for d in dirs]
        start = time.perf_counter()
        experts = experts_from_warmup(sites, cfg)
        table = {s.site_id: {"own expert": evaluate(expert_predictor(s.expert(experts[s.site_id]), s.kind),
                                                    s.test_batches, s.kind, with_hd95=False)["dice_mean"]}
                 for s in sites}
        for label, split in SPLITS.items():
            for site_id, values in gate_results(sites, experts, cfg, split).items():
                table[site_id] |= {f"{label}: {k}": v for k, v in values.items()}
    columns = list(next(iter(table.values())))
    print(f"held-out mean Dice, {len(sites)} sites, seed {args.seed}, {time.perf_counter() - start:.0f} s\n")
    print("| site | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns))
    for site_id, row in table.items():
        print(f"| {site_id} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |")
    print("| mean | " + " | ".join(f"{np.mean([r[c] for r in table.values()]):.3f}" for c in columns) + " |")
    print("| worst | " + " | ".join(f"{min(r[c] for r in table.values()):.3f}" for c in columns) + " |")


if __name__ == "__main__":
    main()
