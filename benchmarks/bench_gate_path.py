"""How much does a site's final Dice depend on the global gate it was sent? Two finished MoME runs on the same sites
and experts (e.g. the gate-hijack benchmark's run without the attacker and its attacked run, `--keep`) differ only in
their global gate. Each site's last step (refresh, personalise, anchor, evaluate: `Site.finalise_mixture`, exactly as
in the federation) is replayed from gates on the straight path between the two, g(t) = (1 - t) g_A + t g_B, under
each personalisation mode. A last step whose outcome is a smooth function of the gate moves little between nearby
gates; one that jumps between t = 0 and t = 0.1 decides on where its start happens to lie.

    python benchmarks/bench_gate_path.py RUN_A RUN_B DATA [--sites site-a,site-b] [--steps 0,0.1,0.5,1]
                                       [--modes prior,gate] [--out docs/bench/gate-path]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from mome.client.site import Site
from mome.common.config import config_from_mapping
from mome.common.wire import SHARED_EXPERT
from mome.server.checkpoint import load_latest


def gate_pair(run: Path, other: Path) -> tuple[dict, dict, dict, dict]:
    """(the experts as sent, run's global gate, other's global gate, run's config) of two runs of one federation."""
    a, b = load_latest(run / "checkpoints"), load_latest(other / "checkpoints")
    if any(not np.array_equal(a.experts[s][k], b.experts[s][k]) for s in a.experts for k in a.experts[s]):
        raise SystemExit(f"{run} and {other} hold different experts: not one federation's two gates")
    experts = {s: a.experts[s] for s in sorted(a.experts)} | {SHARED_EXPERT: a.base}
    return experts, a.gate, b.gate, json.loads((run / "config.json").read_text())


def final_dice(experts: dict, gate: dict, stored: dict, site_dir: Path, mode: str, cache: Path) -> float:
    """The site's kept mixture's mean Dice on its held-out cases, its last step replayed from `gate`."""
    cfg = config_from_mapping({**stored, "personalise": mode})
    torch.set_num_threads(1)  # as in the simulation: the same numbers as the runs themselves at t = 0 and 1
    site = Site.open(site_dir, cfg, out_dir=cache)
    metrics, _ = site.finalise_mixture(experts, gate)
    return float(metrics["mixture.dice_mean"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("data", type=Path, help="the runs' site folders")
    parser.add_argument("--sites", default="", help="site ids (default: every site folder in DATA)")
    parser.add_argument("--steps", default="0,0.1,0.25,0.5,1")
    parser.add_argument("--modes", default="prior,gate", help="personalise modes to replay")
    parser.add_argument("--out", type=Path, help="write <out>.md and <out>.json")
    args = parser.parse_args()
    sites = args.sites.split(",") if args.sites else sorted(p.name for p in args.data.iterdir() if p.is_dir())
    steps = [float(t) for t in args.steps.split(",")]
    experts, gate_a, gate_b, stored = gate_pair(args.run_a, args.run_b)
    path = [{k: (1 - t) * v + t * gate_b[k] for k, v in gate_a.items()} for t in steps]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            for site in sites:
                rows[f"{site}, personalise={mode}"] = [
                    final_dice(experts, gate, stored, args.data / site, mode, Path(tmp) / site) for gate in path]
                print(mode, site, rows[f"{site}, personalise={mode}"], flush=True)
    head = ["| site, mode | " + " | ".join(f"t = {t:g}" for t in steps) + " | largest move from t = 0 |",
            "|---" * (len(steps) + 2) + "|"]
    lines = [f"| {name} | " + " | ".join(f"{d:.3f}" for d in dice) + f" | {max(abs(d - dice[0]) for d in dice):.3f} |"
             for name, dice in rows.items()]
    text = (f"# A site's final Dice along the path between two global gates\n\n`python benchmarks/bench_gate_path.py "
            f"{args.run_a} {args.run_b} {args.data}`: g(t) = (1 - t) x the first run's global gate + t x the "
            "second's, same experts; each site's last step replayed from g(t).\n\n" + "\n".join(head + lines) + "\n")
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps({"steps": steps, "dice": rows}, indent=1))


if __name__ == "__main__":
    main()
