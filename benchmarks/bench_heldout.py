"""How much of a comparison is sampling noise? Re-score a finished synthetic run on more held-out cases.

`mome sim` scores each site on 12 held-out cases, so differences of a few hundredths between strategies can be
sampling noise. Synthetic cases are drawn per (seed, site, case), so regenerating a run's sites with more
held-out cases keeps their training cases and first held-out cases and adds new ones. The models every site ends
up using (`<run>/<strategy>/sites/<site>/model`, e.g. MoME's mixture with that site's personalised gate) are
scored on them; nothing is retrained.

    python benchmarks/bench_heldout.py RUN [--test-cases 60]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np

from mome.client.predict import predictor
from mome.client.site import Site
from mome.common.bundle import load_bundle
from mome.common.config import config_from_mapping
from mome.common.metrics import evaluate
from mome.common.sitedata import find_site_dirs
from mome.server.report import site_table
from mome.sim.run_sim import local_plan
from mome.sim.synth import SiteSpec, generate_site, site_traits


def regenerate(run: Path, out: Path, test_cases: int) -> list[Path]:
    """The run's synthetic sites again, with `test_cases` held-out cases each; checks the training cases match."""
    if not (run / "data").is_dir():
        raise SystemExit(f"{run}: no data/ folder; only runs on generated synthetic sites can be re-scored")
    fields = {f.name for f in dataclasses.fields(SiteSpec)}
    sites = []
    for original in find_site_dirs(run / "data"):
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


def score(run: Path, site_dirs: list[Path]) -> dict[str, dict]:
    """Per strategy, held-out mean Dice of the model each site ends up using, shaped as in metrics.json
    ({strategy: {"sites": {site: {"dice_mean": x}}}}); a site that dropped out of a strategy has no entry."""
    planned = run / "mome" / "config.json"  # the coordinator's config, with the plan the run used
    try:
        cfg = config_from_mapping(json.loads((planned if planned.exists() else run / "config.json").read_text()))
        cfg = local_plan(cfg, site_dirs)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"{run / 'config.json'}: cannot read the run's config ({exc})") from exc
    sites = [Site.open(d, cfg) for d in site_dirs]
    results: dict[str, dict] = {}
    strategies = sorted((p for p in run.iterdir() if (p / "sites").is_dir()), key=lambda p: (p.name != "mome", p.name))
    if not strategies:
        raise SystemExit(f"{run}: no <strategy>/sites/ folders with site models")
    for strategy in strategies:
        scores = {}
        for site in sites:
            folder = strategy / "sites" / site.site_id / "model"
            if folder.is_dir():  # absent when the site dropped out of that run
                scores[site.site_id] = evaluate(predictor(load_bundle(folder)), site.test_batches, site.kind,
                                                with_hd95=False)["dice_mean"]
        results[strategy.name] = {"sites": {k: {"dice_mean": v} for k, v in scores.items()}}
        print(f"{strategy.name}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()), flush=True)
    return results


def table(results: dict[str, dict], site_dirs: list[Path]) -> str:
    """The report's per-site table, plus the mean and the worst site of each strategy."""
    traits = {d.name: site_traits(d) for d in site_dirs}
    lines = site_table(results, [d.name for d in site_dirs], traits)
    pad = " |" if any(traits.values()) else ""
    for label, reduce in (("mean", np.mean), ("worst site", np.min)):
        cells = [f"{reduce([s['dice_mean'] for s in r['sites'].values()]):.3f}" for r in results.values()]
        lines.append(f"| {label} |{pad} " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="a finished `mome sim` run folder on synthetic sites")
    parser.add_argument("--test-cases", type=int, default=60)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        site_dirs = regenerate(args.run, Path(tmp), args.test_cases)
        results = score(args.run, site_dirs)
        print(f"\nmean Dice on {args.test_cases} held-out cases per site\n")
        print(table(results, site_dirs))


if __name__ == "__main__":
    main()
