"""A developer's commands: synthetic sites, the whole federation simulated, the deployment on one machine."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from mome.common.config import Strategy


def _log_to_terminal() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")


def _red(text: str) -> str:
    return f"\033[31m{text}\033[0m" if sys.stderr.isatty() else text


def synth(args: argparse.Namespace) -> int:
    from mome.sim.preview import write_preview
    from mome.sim.synth import generate_federation

    sites = generate_federation(Path(args.out), sites=args.sites, preset=args.preset, seed=args.seed,
                                size=args.size, cases=args.cases, test_cases=args.test_cases)
    for site in sites:
        print(f"wrote {site}")
    if args.preview:
        print(f"preview {write_preview(sites, Path(args.out) / 'preview.png')}")
    return 0


def sim(args: argparse.Namespace) -> int:
    from mome.common.config import config_from_mapping, parse_run_config
    from mome.common.sitedata import SiteDataError, find_site_dirs
    from mome.server.report import write_report
    from mome.sim.preview import site_overlays
    from mome.sim.run_sim import DEMO_BUDGET, run_all
    from mome.sim.synth import generate_federation, site_traits
    from mome.common.wire import site_id_from_name

    _log_to_terminal()
    try:
        strategies = list(Strategy) if args.compare else [Strategy.parse(args.strategy)]
        overrides = parse_run_config(args.run_config)
        overrides.setdefault("seed", args.seed)
        if args.force_resume:
            overrides["force-resume"] = True
        cfg = config_from_mapping(overrides)
        site_dirs = find_site_dirs(args.data) if args.data else []
    except (ValueError, SiteDataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.data and not site_dirs:
        print(f"error: {args.data} holds no site folder (a sub-folder with dataset.json)", file=sys.stderr)
        return 2
    run_dir = Path(args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    if not site_dirs and not args.full:
        demo = {k: v for k, v in DEMO_BUDGET.items() if k not in overrides}
        cfg = config_from_mapping({**overrides, **demo})
        if demo:
            print("demo budget on the built-in sites: " + " ".join(f"{k}={v}" for k, v in demo.items())
                  + " (--full for the config's own)")
    if not site_dirs:
        print(f"generating the synthetic federation (preset {args.preset}, {args.sites} sites, {cfg.size}^3)")
        site_dirs = generate_federation(run_dir / "data", sites=args.sites, preset=args.preset, seed=args.seed,
                                        size=cfg.size, cases=args.cases)
    combined = run_all(strategies, site_dirs, cfg, run_dir)
    traits = {site_id_from_name(d.name): site_traits(d) for d in site_dirs}
    shown = next((s for s in [Strategy.MOME, *strategies] if s in combined["strategies"] and s not in combined["failed"]),
                 None)
    overlays = site_overlays(run_dir, str(shown), site_dirs) if shown else {}
    report = write_report(run_dir, combined["strategies"], traits, overlays)
    print(report.read_text().split("## Mean Dice per site")[0])
    print(f"run folder: {run_dir}\nreport: {report}")
    for name in combined["failed"]:
        print(_red(f"strategy {name} FAILED: {combined['strategies'][name].get('error')}"), file=sys.stderr)
    return 1 if combined["failed"] else 0


def bench(args: argparse.Namespace) -> int:
    from mome.common.config import parse_run_config
    from mome.sim.bench import BenchPlan, run_bench
    from mome.sim.bench_report import summarise, write_results
    from mome.sim.run_sim import DEMO_BUDGET
    from mome.sim.synth import PRESETS

    _log_to_terminal()
    try:
        presets = tuple(p for p in args.presets.split(",") if p)
        if unknown := [p for p in presets if p not in PRESETS]:
            raise ValueError(f"unknown preset(s) {', '.join(unknown)}; choose from {', '.join(PRESETS)}")
        strategies = tuple(Strategy.parse(s).value for s in args.strategies.split(",") if s)
        if args.seeds < 1 or args.sites < 2:
            raise ValueError("--seeds must be at least 1 and --sites at least 2")
        overrides = parse_run_config(args.run_config)
        budget = {} if args.full else {k: v for k, v in DEMO_BUDGET.items() if k not in overrides}
        plan = BenchPlan(presets, tuple(range(args.seeds)), strategies, args.sites, args.cases,
                         {**overrides, **budget}, late_join=not args.no_late_join)
        plan.config(0)  # a bad run-config key fails here, before hours of training
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = summarise(run_bench(plan, Path(args.out)))
    for path in write_results(summary, Path(args.docs)):
        print(f"wrote {path}")
    return 0


def deploy_local(args: argparse.Namespace) -> int:
    from mome.common.config import Config, parse_run_config
    from mome.deploy.local import DeployError, deploy_local as deploy
    from mome.server.report import write_report
    from mome.sim.synth import generate_federation

    _log_to_terminal()
    if args.insecure:
        print("WARNING: --insecure: no TLS and no SuperNode authentication; anyone on this machine can join "
              "or read the traffic. Use only for debugging.", file=sys.stderr)
    run_dir = Path(args.out or f"runs/deploy-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        overrides = parse_run_config(args.run_config)
        data_dir = Path(args.data) if args.data else run_dir / "data"
        if not args.data and not data_dir.exists():
            generate_federation(data_dir, sites=args.sites, preset="mixed", seed=int(overrides.get("seed", 0)),
                                size=int(overrides.get("size", Config().size)))
        combined = deploy(args.sites, run_dir, data_dir, insecure=args.insecure, run_config=overrides,
                          timeout=args.timeout, echo=not args.quiet)
    except (DeployError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: every process of the deployment was stopped", file=sys.stderr)
        return 130
    try:
        print(f"report: {write_report(run_dir, combined['strategies'])}")
    except Exception as exc:  # the report is a convenience; metrics.json is the result
        print(f"(no report.md: {exc})", file=sys.stderr)
    failed = False
    for name, metrics in combined["strategies"].items():
        print(f"{name}: sites {', '.join(sorted(metrics['sites']))}; dropped {len(metrics['dropped'])} time(s)")
        if metrics.get("status") == "failed":
            failed = True
            print(_red(f"strategy {name} FAILED: {metrics.get('error')}"), file=sys.stderr)
    print(f"run folder: {run_dir}\nmetrics: {run_dir}/metrics.json\nlogs: {run_dir}/logs/")
    return 1 if failed else 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="write a synthetic multi-site federation as NIfTI site folders")
    p.add_argument("--out", required=True, help="folder to create the site folders in (required)")
    p.add_argument("--sites", type=int, default=4)
    p.add_argument("--preset", default="mixed",
                   help="iid | scanner-shift | convention-shift | few-shot | missing-modality | mixed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=48, help="voxels per side")
    p.add_argument("--cases", type=int, default=None, help="training cases per (non few-shot) site")
    p.add_argument("--test-cases", type=int, default=None, help="held-out cases per site")
    p.add_argument("--preview", action="store_true", help="also write preview.png (one case per site)")
    p.set_defaults(func=synth)

    p = sub.add_parser("sim", help="run the multi-site federation on Flower's simulation engine")
    p.add_argument("--data", help="folder with one sub-folder per site (default: generate synthetic sites)")
    p.add_argument("--strategy", default=Strategy.MOME.value, help=" | ".join(Strategy))
    p.add_argument("--compare", action="store_true", help="run every strategy on the same data")
    p.add_argument("--out", help="run folder (default runs/<timestamp>)")
    p.add_argument("--sites", type=int, default=4, help="synthetic sites to generate")
    p.add_argument("--preset", default="mixed", help="synthetic preset (see mome synth)")
    p.add_argument("--cases", type=int, default=None, help="synthetic training cases per site")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-config", default="", help='overrides, e.g. "expert-epochs=8 gate-aggregation=dro"')
    p.add_argument("--full", action="store_true",
                   help="on the built-in sites, the config's own budget instead of the 5-minute demo's")
    p.add_argument("--force-resume", action="store_true",
                   help="resume from the run folder's checkpoint even if it was made with another config")
    p.set_defaults(func=sim)

    p = sub.add_parser("bench", help="every strategy on several presets and seeds: mean and worst-site Dice, MoME's "
                                     "paired differences with 95%% intervals (about 90 min on 2 cores by default)")
    p.add_argument("--presets", default="mixed,iid,few-shot,missing-modality", help="comma-separated presets")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per preset")
    p.add_argument("--strategies", default=",".join(Strategy), help="comma-separated strategies")
    p.add_argument("--no-late-join", action="store_true", help="skip the hospital that joins late (`mome adapt` "
                   "per run); a later bench without it adds the late join to the stored runs")
    p.add_argument("--sites", type=int, default=4)
    p.add_argument("--cases", type=int, default=None, help="training cases per (non few-shot) site")
    p.add_argument("--run-config", default="", help="overrides for every run")
    p.add_argument("--full", action="store_true", help="the config's own training budget instead of the demo's "
                                                       "32^3 training patches (about twice as long)")
    p.add_argument("--out", default="runs/bench", help="run folders; a finished run is reused")
    p.add_argument("--docs", default="docs/bench", help="where results.md/json and bench.png go")
    p.set_defaults(func=bench)

    p = sub.add_parser("deploy-local", help="run the federation as local SuperLink/SuperNode processes "
                                            "(TLS + SuperNode auth on loopback)")
    p.add_argument("--sites", type=int, default=3, help="number of sites (SuperNodes)")
    p.add_argument("--data", help="folder with one sub-folder per site (default: generate synthetic sites)")
    p.add_argument("--out", help="run folder (default runs/deploy-<timestamp>)")
    p.add_argument("--insecure", action="store_true",
                   help="INSECURE: plain-text gRPC and no SuperNode authentication (debugging only)")
    p.add_argument("--run-config", default="", help='overrides, e.g. "size=24 expert-epochs=1 round-timeout=60"')
    p.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    p.add_argument("--quiet", action="store_true", help="do not echo the run's log stream")
    p.set_defaults(func=deploy_local)
