"""How much should a site's kept gate lean on its own (refreshed) expert? Scored after the fact on the bundles that
finished `mome bench` (or `mome sim`) runs saved, so that every share is compared on the same experts and the same
personalised gate: the personalised routing alone (P, the anchor of GateNet.anchored taken off) and with a floor of
s on the site's own expert (w = (1 - s) P + s e_own) for fixed shares and for `own-prior-cases`' rule s = 1/(1 + n),
n the cases the gate was personalised on (the site's validation split). Mean Dice on each site's labelled held-out
cases; each run folder is <run>/data/<site> with <run>/mome/sites/<site>/model.

    python benchmarks/bench_own_floor.py RUN [RUN ...]      # e.g. runs/bench/few-shot/seed-{0,1,2}
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from mome.client.site import Site
from mome.common.bundle import load_bundle
from mome.common.cases import to_batches
from mome.common.gate import ANCHOR, gate_weights, load_gate
from mome.common.metrics import dice_per_case
from mome.common.model import expert_logits, load_expert, probabilities
from mome.common.wire import site_id_from_name

SHARES = (0.25, 0.5, 0.75)


def site_scores(run: Path, site_dir: Path) -> dict[str, float]:
    """Mean held-out Dice of each weighting at one site."""
    site_id = site_id_from_name(site_dir.name)
    bundle = load_bundle(run / "mome" / "sites" / site_id / "model")
    names = list(bundle.experts)
    if site_id not in names:
        return {}
    site = Site.open(site_dir, bundle.cfg)
    experts = [load_expert(bundle.cfg, bundle.label_spec.n_out, bundle.experts[n]) for n in names]
    gate = load_gate(bundle.cfg, len(names), {k: v for k, v in bundle.gate.items() if k != ANCHOR})
    own = torch.zeros(len(names))
    own[names.index(site_id)] = 1.0
    rule = 1.0 / (1 + len(site.val_cases or site.train_cases))
    shares = {"P": 0.0, **{f"floor {s:g}": s for s in SHARES}, f"rule 1/(1+n) = {rule:.2f}": rule}
    scores: dict[str, list[float]] = {name: [] for name in shares}
    for batch in to_batches(site.test_cases, 1, site.data.label_spec, bundle.cfg.divisor):
        with torch.no_grad():
            logits = expert_logits(experts, batch, site.kind, site.window)
            routed = gate_weights(gate, batch)
            for name, share in shares.items():
                weights = (1 - share) * routed + share * own
                mixed = (weights[:, :, None, None, None, None] * logits).sum(1)
                dice = dice_per_case(probabilities(mixed, site.kind), batch["label"], site.kind)
                scores[name].append(float(dice.mean()))
    return {name: statistics.mean(values) for name, values in scores.items() if values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+")
    args = parser.parse_args()
    torch.set_num_threads(2)
    table: dict[str, list[float]] = {}
    for run in args.runs:
        for site_dir in sorted(p for p in (run / "data").iterdir() if (p / "dataset.json").exists()):
            scores = site_scores(run, site_dir)
            print(f"{run} {site_dir.name}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()), flush=True)
            for name, value in scores.items():
                table.setdefault(name.split(" = ")[0], []).append(value)
    print("\n| weighting | mean Dice over sites and runs | - P |\n|---|---|---|")
    base = statistics.mean(table["P"])
    for name, values in table.items():
        print(f"| {name} | {statistics.mean(values):.3f} | {statistics.mean(values) - base:+.3f} |")


if __name__ == "__main__":
    main()
