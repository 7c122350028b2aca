"""Join `mome bench` folders that ran different strategies on the same presets and seeds (the baselines as one job,
MoME as another, or on two machines) into one folder that `mome bench` reads as if it had run them all:

    python benchmarks/bench_merge.py OUT FOLDER [FOLDER ...] [--strategies S]   # prints the command for the docs
    mome bench --presets P --strategies S --out OUT --docs docs/bench

Each OUT/<preset>/seed-N links the data and strategy runs of every folder that has that run (--strategies: only
those, in every run); its case_scores.json holds
all their scores and costs under the stamp that command expects (the default demo budget, 4 sites), and the late
join: each folder's (where two folders ran the same strategy, the first folder's run counts, for the late join
as for the scores), plus the part no folder could run (FedAvg's adaptation, when FedAvg ran in another job than
MoME), computed here on the same late site; none where a folder ran with --no-late-join. Folders whose sites differ
(other data) are refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from mome.common.config import Strategy
from mome.sim.bench import BenchPlan, late_join
from mome.sim.run_sim import DEMO_BUDGET


def merge_run(out: Path, runs: list[Path], keep: set[str] | None) -> dict:
    """OUT/<preset>/seed-N from the same run of each folder: its case_scores, and the strategies it holds."""
    stored = [json.loads((run / "case_scores.json").read_text()) for run in runs]
    for scored in stored:
        scored["scores"] = {k: v for k, v in scored["scores"].items() if keep is None or k in keep}
    if any(s["traits"] != stored[0]["traits"] for s in stored):
        raise SystemExit(f"{out}: the folders' sites differ ({', '.join(map(str, runs))}); not the same data")
    out.mkdir(parents=True, exist_ok=True)
    merged = {**stored[0], "scores": {}, "cost": {}}
    late = [s["late_join"] for s in stored if s.get("late_join", {}).get("scores")]
    skipped = any(s.get("late_join") == {} for s in stored)  # `mome bench --no-late-join` ran one of them
    merged["late_join"] = {**late[0], "scores": {k: v for j in reversed(late) for k, v in j["scores"].items()}} \
        if late and not skipped else {}
    for run, scored in zip(runs, stored):
        for strategy in scored["scores"]:
            merged["scores"].setdefault(strategy, scored["scores"][strategy])
            if strategy in scored["cost"]:
                merged["cost"].setdefault(strategy, scored["cost"][strategy])
            link = out / strategy
            if (run / strategy).is_dir() and not link.exists():
                link.symlink_to((run / strategy).resolve())
    if not (out / "data").exists():
        (out / "data").symlink_to((runs[0] / "data").resolve())
    merged["strategies"] = [s for s in Strategy if s in merged["scores"]]
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("folders", type=Path, nargs="+")
    parser.add_argument("--strategies", help="comma-separated: keep only these")
    args = parser.parse_args()
    keep = set(args.strategies.split(",")) if args.strategies else None
    runs = sorted({p.parent.relative_to(folder) for folder in args.folders
                   for p in folder.glob("*/seed-*/case_scores.json")})
    if not runs:
        raise SystemExit("no <preset>/seed-N/case_scores.json in any folder")
    merged = {run: merge_run(args.out / run, [f / run for f in args.folders if (f / run / "case_scores.json").exists()],
                             keep) for run in runs}
    strategies = tuple(sorted({s for m in merged.values() for s in m.pop("strategies")}, key=list(Strategy).index))
    presets = tuple(dict.fromkeys(run.parts[0] for run in runs))
    seeds = tuple(sorted({int(run.parts[1].removeprefix("seed-")) for run in runs}))
    plan = BenchPlan(presets, seeds, strategies, overrides=dict(DEMO_BUDGET))
    for run, scored in merged.items():
        seed = int(run.parts[1].removeprefix("seed-"))
        scored["stamp"] = {"config": plan.config(seed).to_dict(), "strategies": list(strategies),
                           "sites": plan.sites, "cases": plan.cases}
        missing = tuple(s for s in (Strategy.MOME, Strategy.FEDAVG) if s in strategies and scored["late_join"]
                        and f"{s}-adapted" not in scored["late_join"].get("scores", {}))  # none where it was skipped
        if missing:  # adapted where every model of the run is at hand, on the same late site
            extra = late_join(replace(plan, strategies=missing), run.parts[0], seed, args.out / run)
            scored["late_join"] = {**extra, "scores": {**scored["late_join"].get("scores", {}), **extra["scores"]}}
        (args.out / run / "case_scores.json").write_text(json.dumps(scored))
    print(f"merged {len(runs)} runs; now: mome bench --presets {','.join(presets)} --seeds {len(seeds)} "
          f"--strategies {','.join(strategies)} --out {args.out} --docs docs/bench", file=sys.stderr)


if __name__ == "__main__":
    main()
