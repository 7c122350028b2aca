"""What a curious site learns: a loss-threshold membership-inference attack (Yeom et al. 2018) on the weights every
site receives. Each site gets every other site's expert at the gate rounds; with it, a site that holds candidate
cases can ask "was this case in that site's training set?" by the model's loss on it (lower: more likely a member).

For every pair (attacker, victim) this scores the victim's expert, as it sits in the attacker's final bundle, on the
victim's own training cases (members) and its labelled held-out cases (non-members), and reports the attack's AUC
(0.5: the loss tells members from non-members no better than chance). The same for the FedAvg model every site
receives. Runs on the folders `mome bench` (or `mome sim`) left: <run>/data/<site>, <run>/mome, <run>/<fedavg>.

    python benchmarks/bench_membership.py RUN [RUN ...]     # e.g. runs/bench/mixed/seed-0
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch

from mome.client.site import Site
from mome.common.bundle import load_bundle
from mome.common.model import load_expert, model_logits
from mome.common.patches import Window
from mome.common.train import segmentation_loss
from mome.common.wire import site_id_from_name

SHARED_MODELS = ("fedavg", "fedavg-ft")  # <run>/<strategy>/model: the shared model every site receives


def case_losses(model, batches: list[dict], kind, window: Window) -> list[float]:
    """The training loss of each case (one-case batches), as the attacker would compute it."""
    loss_fn, out = segmentation_loss(kind), []
    model.eval()
    with torch.no_grad():
        for batch in batches:
            out.append(float(loss_fn(model_logits(model, batch, window), batch["label"])))
    return out


def auc(members: list[float], others: list[float]) -> float:
    """P(a member's loss < a non-member's loss), ties half: the attack's ROC AUC (Mann-Whitney)."""
    m, o = np.asarray(members)[:, None], np.asarray(others)[None, :]
    return float(((m < o).sum() + 0.5 * (m == o).sum()) / (m.size * o.size))


def attack_run(run: Path) -> dict:
    sites = {site_id_from_name(d.name): d for d in sorted((run / "data").iterdir()) if (d / "dataset.json").exists()}
    bundles = {s: load_bundle(run / "mome" / "sites" / s / "model") for s in sites
               if (run / "mome" / "sites" / s / "model" / "metadata.json").exists()}
    shared = next((load_bundle(run / s / "model") for s in SHARED_MODELS if (run / s / "model").exists()), None)
    if not bundles:
        raise SystemExit(f"{run}: no MoME site bundles under mome/sites/")
    cfg = next(iter(bundles.values())).cfg
    window, out = Window.from_config(cfg), {"experts": {}, "shared": {}}
    for victim, folder in sites.items():
        site = Site.open(folder, cfg)
        members = [b for c in site.train_cases for b in site.batches([c])]
        others = [b for c in site.test_cases for b in site.batches([c])]
        attackers = [a for a, b in bundles.items() if a != victim and victim in b.experts]
        if attackers:  # every attacker holds the same expert of the victim: score it once
            state = bundles[attackers[0]].experts[victim]
            model = load_expert(cfg, site.data.label_spec.n_out, state)
            out["experts"][victim] = auc(case_losses(model, members, site.kind, window),
                                         case_losses(model, others, site.kind, window))
        if shared is not None:
            model = load_expert(shared.cfg, site.data.label_spec.n_out, next(iter(shared.experts.values())))
            out["shared"][victim] = auc(case_losses(model, members, site.kind, window),
                                        case_losses(model, others, site.kind, window))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {str(run): attack_run(run) for run in args.runs}
    print("| run | victim | AUC against its expert (held by every other site) | AUC against the FedAvg model |")
    print("|---|---|---|---|")
    for run, res in results.items():
        for victim in sorted(set(res["experts"]) | set(res["shared"])):
            e, s = res["experts"].get(victim), res["shared"].get(victim)
            print(f"| {Path(run).parent.name}/{Path(run).name} | {victim} | {e if e is None else f'{e:.2f}'} | "
                  f"{s if s is None else f'{s:.2f}'} |")
    experts = [v for r in results.values() for v in r["experts"].values()]
    shared = [v for r in results.values() for v in r["shared"].values()]
    for name, values in (("experts", experts), ("FedAvg model", shared)):
        if values:
            print(f"{name}: AUC mean {statistics.mean(values):.2f}, max {max(values):.2f} over {len(values)} victims")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
