"""A MoME method change against the current method and the baselines, from `mome bench` folders run on the same
presets and seeds: the variant's folder (strategy mome, run with the variant's --run-config) is paired case by case
with a base folder (mome and the baselines, default config), with the same intervals `mome bench` reports.

    mome bench --presets few-shot --strategies mome,fedavg-ft --out runs/ab/base --docs runs/ab/base
    mome bench --presets few-shot --strategies mome --run-config "k=v ..." --out runs/ab/variant --docs runs/ab/variant
    python benchmarks/bench_variants.py runs/ab/base runs/ab/variant [--out docs/bench/variant.md]

In the tables "mome" is the variant and "mome-base" the method as it was; per seed and site the variant's own
expert (E), global-gate mixture (G) and personalised mixture (P) are listed from its metrics.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mome.sim.bench_report import load_results, markdown, summarise


def merged(base: Path, variant: Path) -> dict:
    results = load_results(base)
    for preset, runs in results.items():
        for seed, run in runs.items():
            run["scores"] = {("mome-base" if k == "mome" else k): v for k, v in run["scores"].items()}
            run.pop("late_join", None)
            path = variant / preset / f"seed-{seed}" / "case_scores.json"
            if path.exists():
                run["scores"]["mome"] = json.loads(path.read_text())["scores"]["mome"]
    return results


def diagnostics(folder: Path) -> list[str]:
    lines = []
    for path in sorted(folder.glob("*/seed-*/mome/metrics.json")):
        sites = json.loads(path.read_text()).get("sites", {})
        cells = []
        for site, entry in sorted(sites.items()):
            variants = entry.get("variants", {})
            score = {k: variants.get(k, {}).get("dice_mean", float("nan")) for k in ("expert", "mixture_global")}
            cells.append(f"{site} E {score['expert']:.3f} G {score['mixture_global']:.3f} "
                         f"P {entry.get('dice_mean', float('nan')):.3f}")
        lines.append(f"- {path.parents[2].name}/{path.parents[1].name}: " + "; ".join(cells))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", type=Path)
    parser.add_argument("variant", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--title", help="what the variant is (default: the folders' names)")
    args = parser.parse_args()
    title = args.title or f"{args.variant.name} against {args.base.name}"
    text = markdown(summarise(merged(args.base, args.variant)), title)
    text += "\n\nOwn expert (E), global-gate mixture (G), personalised mixture (P) per site, held-out Dice:\n\n"
    text += "\n".join(diagnostics(args.variant)) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
