"""What deployment costs per step over the simulation, on the same sites and config.

In deployment Flower starts a fresh `flwr-clientapp` process for every message; the app bundle's ClientApp there is
only the relay (client/relay.py), which hands the message to the site's long-running worker (`mome site serve`),
where torch, the loaded cases and the cache stay in memory. This runs the same MoME federation through `mome sim`
(Flower's simulation engine) and `mome deploy-local` (SuperLink, SuperNodes, site workers, gRPC over loopback,
TLS, signed replies) and reports:
- the seconds per protocol step of each (from each run's metrics.json) and their ratio;
- what the project adds to each message's process beyond Flower's own: a fresh interpreter importing the relay
  against one importing only Flower's ClientApp (the baseline, measured in the same run);
- each worker's resident memory at every step (it must stay flat: nothing grows per message).

    python benchmarks/bench_deploy_overhead.py [--sites 3] [--size 32] [--cases 6]
    python benchmarks/bench_deploy_overhead.py --default    # `mome sim`'s default federation (4 sites, its budget)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from mome.common.config import config_from_mapping, parse_run_config
from mome.sim.run_sim import DEMO_BUDGET, simulate
from mome.sim.synth import generate_federation

RUN_CONFIG = ('channels="8,16,32" stem-channels=4 warmup-rounds=2 warmup-epochs=1 expert-epochs=1 gate-steps=4 '
              'gate-rounds=2 personalise-epochs=1 min-cases=1 round-timeout=600')
IMPORT_REPS = 5


def step_seconds(metrics: dict) -> list[tuple[str, float]]:
    return [(r["phase"], r["seconds"]) for r in metrics["rounds"]]


def import_seconds(module: str) -> float:
    """Median wall time of a fresh interpreter that imports `module` (what each message's process pays)."""
    times = []
    for _ in range(IMPORT_REPS):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import {module}"], check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker_rss_mb() -> dict[int, float]:
    """Resident memory of every running site worker (`mome site serve`), by pid."""
    found = {}
    for proc in psutil.process_iter(["cmdline", "memory_info"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "site serve" in cmdline and proc.info["memory_info"] is not None:
            found[proc.pid] = proc.info["memory_info"].rss / 2**20
    return found


class MemorySampler(threading.Thread):
    """Samples the workers' memory twice a second and the coordinator's finished steps (its checkpoints)."""

    def __init__(self, checkpoints: Path):
        super().__init__(daemon=True)
        self.checkpoints, self.samples, self.done = checkpoints, [], threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.5):
            steps = len(list(self.checkpoints.glob("step_*.npz"))) if self.checkpoints.exists() else 0
            if rss := worker_rss_mb():
                self.samples.append((steps, sum(rss.values()) / len(rss)))

    def per_step(self) -> list[tuple[int, float]]:
        """The workers' mean RSS (MB) when each step finished (the last sample taken during it)."""
        last: dict[int, float] = {}
        for steps, mb in self.samples:
            last[steps] = mb
        return sorted(last.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--default", action="store_true", help="the default federation and budget (`mome sim`'s), "
                        "not tiny steps; --sites/--size/--cases are ignored")
    args = parser.parse_args()
    from mome.deploy.local import deploy_local

    flower, relay = import_seconds("flwr.clientapp"), import_seconds("mome.client.relay")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.default:
            overrides = dict(DEMO_BUDGET)
            cfg = config_from_mapping(overrides)
            args.sites = 4
            sites = generate_federation(root / "data", sites=args.sites, preset="mixed", seed=cfg.seed, size=cfg.size)
        else:
            overrides = parse_run_config(RUN_CONFIG)
            sites = generate_federation(root / "data", sites=args.sites, preset="mixed", seed=0, size=args.size,
                                        cases=args.cases, test_cases=2)
        start = time.perf_counter()
        sim = simulate("mome", sites, config_from_mapping(overrides), root / "sim")
        sim_wall = time.perf_counter() - start
        sampler = MemorySampler(root / "deploy" / "mome" / "checkpoints")
        sampler.start()
        start = time.perf_counter()
        deployed = deploy_local(args.sites, root / "deploy", root / "data", run_config=overrides)
        deploy_wall = time.perf_counter() - start
        sampler.done.set()
        deployed = deployed["strategies"]["mome"]
    rows = list(zip(step_seconds(sim), step_seconds(deployed)))
    print("| step | mome sim (s) | deploy-local (s) | ratio |\n|---|---|---|---|")
    for (phase, s), (_, d) in rows:
        print(f"| {phase} | {s:.1f} | {d:.1f} | {d / s:.2f} |")
    sim_steps, dep_steps = sum(s for (_, s), _ in rows), sum(d for _, (_, d) in rows)
    print(f"\nall steps: {sim_steps:.1f} s simulated, {dep_steps:.1f} s deployed, ratio {dep_steps / sim_steps:.2f}; "
          f"whole run (start-up included): {sim_wall:.0f} s simulated, {deploy_wall:.0f} s deployed")
    print(f"per message, a fresh interpreter importing Flower's ClientApp: {flower:.2f} s (Flower's own cost); "
          f"importing the relay: {relay:.2f} s; the project adds {relay - flower:+.2f} s (median of {IMPORT_REPS})")
    memory = sampler.per_step()
    print("worker RSS (MB, mean over sites) after each finished step: "
          + ", ".join(f"{steps}: {mb:.0f}" for steps, mb in memory))
    print(json.dumps({"sim": step_seconds(sim), "deploy": step_seconds(deployed), "import_s": [flower, relay],
                      "worker_rss_mb": memory, "wall_s": [sim_wall, deploy_wall]}))


if __name__ == "__main__":
    main()
