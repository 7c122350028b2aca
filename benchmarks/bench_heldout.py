"""How much of a comparison is sampling noise? Re-score a finished synthetic run on more held-out cases.

`mome sim` scores each site on 12 held-out cases, so differences of a few hundredths between strategies can be
sampling noise. Synthetic cases are drawn per (seed, site, case), so regenerating a run's sites with more
held-out cases keeps their training cases and first held-out cases and adds new ones. The models every site ends
up using (`<run>/<strategy>/sites/<site>/model`, e.g. MoME's mixture with that site's personalised gate) are
scored on them; nothing is retrained. `local` and `centralized` keep no per-site models, so they are not scored.

    python benchmarks/bench_heldout.py RUN [--test-cases 60]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np

from client.site import Site
from common.bundle import load_bundle
from common.config import config_from_mapping
from common.metrics import evaluate
from common.predict import predictor
from sim.synth import SiteSpec, generate_site


def regenerate(run: Path, out: Path, test_cases: int) -> list[Path]:
    """The run's synthetic sites again, with `test_cases` held-out cases each; checks the training cases match."""
    if not (run / "data").is_dir():
        raise SystemExit(f"{run}: no data/ folder; only runs on generated synthetic sites can be re-scored")
    fields = {f.name for f in dataclasses.fields(SiteSpec)}
    sites = []
    for original in sorted(p.parent for p in (run / "data").glob("*/dataset.json")):
        meta = json.loads((original / "dataset.json").read_text()).get("synthetic")
        if meta is None:
            raise SystemExit(f"{original}: not a synthetic site (no 'synthetic' entry in dataset.json)")
        spec = SiteSpec(**{k: v for k, v in meta.items() if k in fields} | {"n_test": test_cases})
        site = generate_site(spec, out, meta["size"], meta["seed"])
        first = sorted((original / "labelsTr").iterdir())[0]
        if (site / "labelsTr" / first.name).read_bytes() != first.read_bytes():
            raise SystemExit(f"{first}: regenerated differently; the generator changed since this run")
        sites.append(site)
    return sites


def score(run: Path, site_dirs: list[Path]) -> dict[str, dict[str, float]]:
    """strategy -> site -> held-out mean Dice of the model that site ends up using."""
    try:
        cfg = config_from_mapping(json.loads((run / "config.json").read_text()))
    except (OSError, ValueError) as exc:
        raise SystemExit(f"{run / 'config.json'}: cannot read the run's config ({exc})") from exc
    sites = [Site.open(d, cfg) for d in site_dirs]
    results: dict[str, dict[str, float]] = {}
    strategies = sorted((p for p in run.iterdir() if (p / "sites").is_dir()), key=lambda p: (p.name != "mome", p.name))
    if not strategies:
        raise SystemExit(f"{run}: no <strategy>/sites/ folders with site models")
    for strategy in strategies:
        results[strategy.name] = {}
        for site in sites:
            folder = strategy / "sites" / site.site_id / "model"
            if not folder.is_dir():  # the site dropped out of that run
                results[strategy.name][site.site_id] = float("nan")
                continue
            dice = evaluate(predictor(load_bundle(folder)), site.test, site.kind, with_hd95=False)["dice_mean"]
            results[strategy.name][site.site_id] = dice
        print(f"{strategy.name}: " + ", ".join(f"{k} {v:.3f}" for k, v in results[strategy.name].items()), flush=True)
    return results


def table(results: dict[str, dict[str, float]], n_test: int) -> str:
    names = list(results)
    site_ids = list(next(iter(results.values())))
    lines = [f"| mean Dice on {n_test} held-out cases per site | " + " | ".join(names) + " |",
             "|---" * (len(names) + 1) + "|"]
    for sid in site_ids:
        lines.append(f"| {sid} | " + " | ".join(f"{results[n][sid]:.3f}" for n in names) + " |")
    lines.append("| mean | " + " | ".join(f"{np.nanmean(list(results[n].values())):.3f}" for n in names) + " |")
    lines.append("| worst site | " + " | ".join(f"{np.nanmin(list(results[n].values())):.3f}" for n in names) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="a finished `mome sim` run folder on synthetic sites")
    parser.add_argument("--test-cases", type=int, default=60)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = score(args.run, regenerate(args.run, Path(tmp), args.test_cases))
    print(table(results, args.test_cases))


if __name__ == "__main__":
    main()
