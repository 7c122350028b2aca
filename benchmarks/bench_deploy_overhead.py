"""What deployment costs per step over the simulation, on the same sites and config.

In deployment every message starts a fresh ClientApp process, which must read the site again; with the
preprocessed-case cache under the site's out-dir it reads the cache instead of preprocessing. This runs the same
MoME federation through `mome sim` (Flower's simulation engine) and `mome deploy-local` (SuperLink, SuperNodes,
gRPC over loopback, TLS) and compares the seconds per protocol step recorded in each run's metrics.json.

    python benchmarks/bench_deploy_overhead.py [--sites 3] [--size 32] [--cases 6]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
from pathlib import Path

from mome.common.config import parse_run_config
from mome.sim.run_sim import simulate
from mome.sim.synth import generate_federation

RUN_CONFIG = ('channels="8,16,32" stem-channels=4 warmup-rounds=2 warmup-epochs=1 expert-epochs=1 gate-steps=4 '
              'gate-rounds=2 personalise-epochs=1 min-cases=1 round-timeout=600')


def step_seconds(metrics: dict) -> list[tuple[str, float]]:
    return [(r["phase"], r["seconds"]) for r in metrics["rounds"]]


def startup_seconds(log_dir: Path) -> tuple[list[float], list[float]]:
    """From the sites' logs: how long each ClientApp process ran before its handler began (imports), and how long it
    took to open the site (the preprocessed-case cache)."""
    text = "\n".join(p.read_text(errors="replace") for p in sorted(log_dir.glob("site-*.log")))
    return ([float(s) for s in re.findall(r"starts ([\d.]+) s after its process", text)],
            [float(s) for s in re.findall(r": loaded \S+ in ([\d.]+) s", text)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--cases", type=int, default=6)
    args = parser.parse_args()
    from mome.common.config import config_from_mapping
    from mome.deploy.local import deploy_local

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sites = generate_federation(root / "data", sites=args.sites, preset="mixed", seed=0, size=args.size,
                                    cases=args.cases, test_cases=2)
        overrides = parse_run_config(RUN_CONFIG)
        sim = simulate("mome", sites, config_from_mapping(overrides), root / "sim")
        deployed = deploy_local(args.sites, root / "deploy", root / "data", run_config=overrides)
        deployed = deployed["strategies"]["mome"]
        started, opened = startup_seconds(root / "deploy" / "logs")
    rows = list(zip(step_seconds(sim), step_seconds(deployed)))
    print("| step | mome sim (s) | deploy-local (s) | ratio |\n|---|---|---|---|")
    for (phase, s), (_, d) in rows:
        print(f"| {phase} | {s:.1f} | {d:.1f} | {d / s:.2f} |")
    later = rows[1:]  # the first step also fills the cache (and the simulation's in-memory copy)
    sim_mean, dep_mean = statistics.mean(s for (_, s), _ in later), statistics.mean(d for _, (_, d) in later)
    print(f"\nsteps 2..{len(rows)}: {sim_mean:.1f} s simulated, {dep_mean:.1f} s deployed, "
          f"ratio {dep_mean / sim_mean:.2f}, overhead {dep_mean - sim_mean:+.1f} s per step")
    if started:
        print(f"each ClientApp process ({len(started)}): {statistics.median(started):.1f} s (median) from its start to "
              f"its handler, then {statistics.median(opened):.1f} s to open the site's cached cases")
    print(json.dumps({"sim": step_seconds(sim), "deploy": step_seconds(deployed)}))


if __name__ == "__main__":
    main()
