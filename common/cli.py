"""The `mome` command: thin entry points over the plain API functions of each package."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_synth(args: argparse.Namespace) -> int:
    from sim.synth import generate_federation, write_preview

    sites = generate_federation(Path(args.out), sites=args.sites, preset=args.preset, seed=args.seed,
                                size=args.size, cases=args.cases, test_cases=args.test_cases)
    for site in sites:
        print(f"wrote {site}")
    if args.preview:
        print(f"preview {write_preview(sites, Path(args.out) / 'preview.png')}")
    return 0


def cmd_check_data(args: argparse.Namespace) -> int:
    from common.config import Config
    from common.sitedata import SiteDataError, load_site

    cfg = Config(modalities=args.modalities, clinical_fields=args.clinical_fields, size=args.size)
    worst = 0
    for site_dir in args.site_dirs:
        try:
            data = load_site(site_dir, cfg)
        except SiteDataError as exc:
            print(f"site {site_dir}\n  unusable: {exc}")
            worst = 1
            continue
        print(data.report.format())
        if not data.train:
            print("  unusable: no training case passed validation")
            worst = 1
    return worst


def cmd_sim(args: argparse.Namespace) -> int:
    import logging
    import time

    from common.config import config_from_mapping, parse_overrides
    from server.report import write_report
    from sim.run_sim import ALL_STRATEGIES, run_all
    from sim.synth import generate_federation, site_traits

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    overrides = parse_overrides(args.run_config or "")
    overrides.setdefault("seed", args.seed)
    cfg = config_from_mapping(overrides)
    run_dir = Path(args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    if args.data:
        site_dirs = sorted(p for p in Path(args.data).iterdir() if (p / "dataset.json").exists())
        if not site_dirs:
            print(f"error: {args.data} holds no site folder (a sub-folder with dataset.json)", file=sys.stderr)
            return 2
    else:
        print(f"generating the synthetic federation (preset {args.preset}, {args.sites} sites, {cfg.size}^3)")
        site_dirs = generate_federation(run_dir / "data", sites=args.sites, preset=args.preset, seed=args.seed,
                                        size=cfg.size, cases=args.cases)
    strategies = list(ALL_STRATEGIES) if args.compare else [args.strategy]
    unknown = [s for s in strategies if s not in ALL_STRATEGIES]
    if unknown:
        print(f"error: unknown strategy {unknown[0]!r}; choose from {', '.join(ALL_STRATEGIES)}", file=sys.stderr)
        return 2
    combined = run_all(strategies, site_dirs, cfg, run_dir)
    report = write_report(run_dir, combined["strategies"], {d.name: site_traits(d) for d in site_dirs})
    print(report.read_text().split("## Mean Dice per site")[0])
    print(f"run folder: {run_dir}\nreport: {report}")
    for name in combined["failed"]:
        print(_red(f"strategy {name} FAILED: {combined['strategies'][name].get('error')}"), file=sys.stderr)
    return 1 if combined["failed"] else 0


def _red(text: str) -> str:
    return f"\033[31m{text}\033[0m" if sys.stderr.isatty() else text


def cmd_predict(args: argparse.Namespace) -> int:
    from common.predict import predict

    written, problems = predict(Path(args.model), [Path(p) for p in args.input], Path(args.out))
    for path in written:
        print(f"wrote {path}")
    for problem in problems:
        print(f"skipped {problem}", file=sys.stderr)
    return 0 if written else 1


# -- deployment (sim/topology.py, sim/certs.py, sim/deploy_local.py) -------------------------------
def cmd_compose(args: argparse.Namespace) -> int:
    from sim.topology import Topology, render_compose

    Path(args.out).write_text(render_compose(Topology.for_compose(args.sites, args.data)))
    print(f"wrote {args.out} ({args.sites} sites, data from {args.data}/<site-id>); "
          f"check it with: docker-compose -f {args.out} config -q")
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    from sim.certs import DEFAULT_SERVER_NAMES, write_certificates
    from sim.topology import Topology

    top = Topology.build(args.sites)
    names = tuple(dict.fromkeys([*DEFAULT_SERVER_NAMES, *args.server_name]))
    paths = write_certificates(Path(args.out), list(top.site_ids), names, days=args.days, overwrite=args.overwrite)
    # the Flower CLI connection the compose file's coordinator services (enrol-*, run) mount
    (paths.root / "flwr").mkdir(exist_ok=True)
    (paths.root / "flwr" / "config.toml").write_text(top.flower_config())
    print(f"CA and SuperLink certificate ({', '.join(names)}) in {paths.root}")
    for site in top.site_ids:
        print(f"  {site}: give {paths.site_key(site)} to the site (keep it secret); "
              f"enrol {paths.site_public_key(site)}")
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    from sim.deploy_local import check_health

    healthy = check_health(args.address, args.timeout)
    print("SERVING" if healthy else f"not serving: {args.address}")
    return 0 if healthy else 1


def cmd_deploy_local(args: argparse.Namespace) -> int:
    import logging
    import time

    from sim.deploy_local import DeployError, deploy_local

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    if args.insecure:
        print("WARNING: --insecure: no TLS and no SuperNode authentication; anyone on this machine can join "
              "or read the traffic. Use only for debugging.", file=sys.stderr)
    run_dir = Path(args.out or f"runs/deploy-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        combined = deploy_local(args.sites, run_dir, Path(args.data) if args.data else None, insecure=args.insecure,
                                run_config=args.run_config, timeout=args.timeout, echo=not args.quiet)
    except (DeployError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: every process of the deployment was stopped", file=sys.stderr)
        return 130
    try:
        from server.report import write_report

        print(f"report: {write_report(run_dir, combined['strategies'])}")
    except Exception as exc:  # the report is a convenience; metrics.json is the result
        print(f"(no report.md: {exc})", file=sys.stderr)
    for name, metrics in combined["strategies"].items():
        print(f"{name}: sites {', '.join(sorted(metrics['sites']))}; dropped {len(metrics['dropped'])} time(s)")
    print(f"run folder: {run_dir}\nmetrics: {run_dir}/metrics.json\nlogs: {run_dir}/logs/")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from common.config import Config

    defaults = Config()
    parser = argparse.ArgumentParser(prog="mome", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

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
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("check-data", help="validate site folders; exit 1 if a site has no usable case")
    p.add_argument("site_dirs", nargs="+", type=Path, metavar="SITE_DIR")
    p.add_argument("--modalities", default=defaults.modalities)
    p.add_argument("--clinical-fields", default=defaults.clinical_fields)
    p.add_argument("--size", type=int, default=defaults.size)
    p.set_defaults(func=cmd_check_data)

    p = sub.add_parser("sim", help="run the multi-site federation on Flower's simulation engine")
    p.add_argument("--data", help="folder with one sub-folder per site (default: generate synthetic sites)")
    p.add_argument("--strategy", default="mome", help="mome | fedavg | fedavg-ft | local | centralized")
    p.add_argument("--compare", action="store_true", help="run every strategy on the same data")
    p.add_argument("--out", help="run folder (default runs/<timestamp>)")
    p.add_argument("--sites", type=int, default=4, help="synthetic sites to generate")
    p.add_argument("--preset", default="mixed", help="synthetic preset (see mome synth)")
    p.add_argument("--cases", type=int, default=None, help="synthetic training cases per site")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-config", default="", help='overrides, e.g. "expert-epochs=8 gate-aggregation=dro"')
    p.set_defaults(func=cmd_sim)

    p = sub.add_parser("predict", help="write NIfTI segmentations with a saved model bundle")
    p.add_argument("--model", required=True, help="bundle folder (e.g. <run>/mome/sites/<site>/model)")
    p.add_argument("--input", required=True, nargs="+",
                   help="a site folder, or files/folders of <case>_<cccc>.nii.gz (cccc = modality index)")
    p.add_argument("--out", required=True, help="folder for <case>.nii.gz")
    p.set_defaults(func=cmd_predict)
    p = sub.add_parser("compose", help="write docker-compose.yml from the deployment topology (sim/topology.py)")
    p.add_argument("--sites", type=int, default=3, help="one SuperNode service per site (default 3)")
    p.add_argument("--data", default="./data", help="host folder holding one folder per site (site-a, ...)")
    p.add_argument("--out", default="docker-compose.yml", help="file to write (default docker-compose.yml)")
    p.set_defaults(func=cmd_compose)

    p = sub.add_parser("certs", help="create the CA, the SuperLink TLS certificate and one auth key pair per site")
    p.add_argument("--out", required=True, help="folder for the certificates and keys (required; keep private)")
    p.add_argument("--sites", type=int, default=3, help="key pairs for site-a, site-b, ... (default 3)")
    p.add_argument("--server-name", action="append", default=[],
                   help="extra DNS name or IP of the SuperLink for its certificate (repeatable)")
    p.add_argument("--days", type=int, default=365, help="validity of the certificates")
    p.add_argument("--overwrite", action="store_true", help="replace an existing CA and every key")
    p.set_defaults(func=cmd_certs)

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
    p.set_defaults(func=cmd_deploy_local)

    p = sub.add_parser("health", help="exit 0 if a SuperLink/SuperNode gRPC health service answers SERVING")
    p.add_argument("--address", required=True, help="host:port of --health-server-address (required)")
    p.add_argument("--timeout", type=float, default=3.0)
    p.set_defaults(func=cmd_health)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
