"""`mome sim`: the whole federation on Flower's simulation engine, plus the non-federated baselines."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
from flwr.app import Context
from flwr.simulation import run_simulation

from mome.client.client_app import make_client_app
from mome.client.policy import SitePolicy
from mome.client.site import Site
from mome.common.atomic import write_json
from mome.common.config import Config, Strategy
from mome.common.wire import Status, site_id_from_name
from mome.server.results import FAILED, headline, headline_variant, site_entry, strategy_metrics
from mome.server.server_app import make_server_app
from mome.common.patches import PatchLoader
from mome.server.plan import make_plan, planned_config, site_geometry
from mome.sim.baselines import train_centralized, train_local

log = logging.getLogger("mome.sim")
# `mome sim` and `mome bench` on the built-in synthetic sites: training patches of at most 32^3 voxels (the plan's
# own patch is the whole 40^3 synthetic head; inference still sees whole heads), which halves the training time
DEMO_BUDGET = {"max-patch-voxels": 32**3}


def partition_locator(site_dirs: list[Path], out_dir: Path):
    """Simulation nodes only know their partition id: map it onto a site folder."""

    def locate(context: Context) -> tuple[Path, str, Path]:
        torch.set_num_threads(1)  # one thread per site whatever OMP_NUM_THREADS says: the same numbers anywhere
        site_dir = site_dirs[int(context.node_config["partition-id"])]
        site = site_id_from_name(site_dir.name)
        return site_dir, site, out_dir / "sites" / site

    return locate


class _NoRunSimulationNotice(logging.Filter):
    """Flower 1.39 calls `run_simulation` deprecated for `flwr run`, which cannot take the in-process mods and site
    policies that tests and benchmarks pass: a notice for Flower's users, not for the console of `mome sim`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`run_simulation` function is deprecated" not in record.getMessage()


logging.getLogger("flwr").addFilter(_NoRunSimulationNotice())


def simulate(strategy: str, site_dirs: list[Path], cfg: Config, run_dir: Path, mods: list | None = None,
             policies: dict[str, SitePolicy] | None = None) -> dict:
    """One federated strategy on Flower's simulation engine; returns its metrics.json content.

    mods: Flower client mods wrapped around every site's handlers (tests inspect replies with them).
    policies: a site's own limits by site id (default: SitePolicy's)."""
    import json

    out_dir = run_dir / strategy
    cfg = cfg.replace(strategy=strategy, start_sites=len(site_dirs))
    # One thread per site (set in the locator), as many sites side by side as there are cores, at most one worker
    # (a torch process) per site: on 2 cores ~25% sooner than one site at a time with both (small 3D convolutions
    # scale poorly), and the same numbers on any machine and for any number of sites (threads change float sums)
    workers = max(1, min(len(site_dirs), len(os.sched_getaffinity(0))))
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               # a Ray of its own: another simulation's cluster on this machine would take down our actors when it ends
               "init_args": {"address": "local", "num_cpus": workers, "include_dashboard": False}}
    locate = partition_locator(site_dirs, out_dir)

    def policy_of(context: Context) -> SitePolicy:
        return (policies or {}).get(locate(context)[1], SitePolicy())

    path = out_dir / "metrics.json"
    path.unlink(missing_ok=True)  # a stale one must not pass for this run's result
    try:
        run_simulation(server_app=make_server_app(cfg, out_dir),
                       client_app=make_client_app(locate, mods, policy_of),
                       num_supernodes=len(site_dirs), backend_config=backend)
    except Exception:
        if not path.exists():  # the server app records why it stopped (quorum, refused resume) before raising
            raise
    if not path.exists():
        raise RuntimeError(f"{strategy}: the simulation ended without writing {path}; see the log above")
    return json.loads(path.read_text())


def local_plan(cfg: Config, site_dirs: list[Path]) -> Config:
    """The plan the coordinator would make from these sites' aggregate geometry (for runs without one)."""
    if cfg.planned:
        return cfg
    reported = [site_geometry(Site.open(d, cfg).describe()) for d in site_dirs]
    return planned_config(cfg, make_plan([g for g in reported if g is not None], cfg))


def run_baseline(strategy: str, site_dirs: list[Path], cfg: Config, run_dir: Path) -> dict:
    """`local` or `centralized`, trained without Flower on the same splits and budget; each site's model is saved
    (at <run>/<strategy>/sites/<site>/model) before it is evaluated, as in the federated strategies."""
    start = time.perf_counter()
    # the same number of local training epochs a site spends in the federated strategies
    budget = local_plan(cfg.replace(strategy=strategy, expert_epochs=cfg.local_epochs), site_dirs)
    out_dir = run_dir / strategy
    sites = [Site.open(d, budget, out_dir=out_dir / "sites" / site_id_from_name(d.name)) for d in site_dirs]
    shape = (budget, sites[0].kind, sites[0].data.label_spec.n_out)
    if strategy == Strategy.LOCAL:
        models = train_local([(s.patches("local"), s.val_batches) for s in sites], *shape)
    else:
        pooled = PatchLoader([c for s in sites for c in s.train_cases], budget, sites[0].data.label_spec)
        models = [train_centralized(pooled, [b for s in sites for b in s.val_batches], *shape)] * len(sites)
    entries = {}
    for site, model in zip(sites, models):
        try:
            flat, outcome = site.finalise_model(model, strategy)
        except Exception as exc:  # one site's failure is that site's, as in the federated strategies
            log.exception("%s: the final step failed at %s", strategy, site.site_id)
            flat, outcome = {"model_saved": 0}, {"status": str(Status.FAILED), "reason": type(exc).__name__}
        entries[site.site_id] = site_entry({**flat, **outcome}, headline_variant(strategy))
    metrics = strategy_metrics(budget, sites[0].data.label_spec.metric_names, entries, time.perf_counter() - start)
    write_json(out_dir / "metrics.json", metrics)
    return metrics


def run_all(strategies: list[Strategy], site_dirs: list[Path], cfg: Config, run_dir: Path) -> dict:
    """Run each strategy on the same data; a strategy that fails is recorded as failed and the next one runs.
    Gathers <run>/metrics.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "config.json")
    results = {}
    for strategy in strategies:
        log.info("strategy %s", strategy)
        runner = simulate if Strategy(strategy).federated else run_baseline
        start = time.perf_counter()
        try:
            results[strategy] = runner(strategy, site_dirs, cfg, run_dir)
        except Exception as exc:  # the other strategies still run; the failure is reported, not lost
            log.exception("strategy %s failed", strategy)
            results[strategy] = strategy_metrics(cfg.replace(strategy=strategy), [], {}, time.perf_counter() - start,
                                                 error=f"{type(exc).__name__}: {exc}")
            write_json(run_dir / strategy / "metrics.json", results[strategy])
        log.info("%s: %s", strategy, headline(results[strategy]))
    combined = {"sites": [site_id_from_name(d.name) for d in site_dirs], "strategies": results,
                "failed": [s for s, m in results.items() if m.get("status") == FAILED]}
    write_json(run_dir / "metrics.json", combined)
    return combined
