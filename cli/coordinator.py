"""A coordinator's commands: certificates (and trial site keys), the compose file, health probes, a run's status."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mome.deploy.certs import CertPaths


def certs(args: argparse.Namespace) -> int:
    from mome.deploy.certs import DEFAULT_SERVER_NAMES, write_certificates
    from mome.deploy.topology import Topology

    top = Topology.build(args.sites)
    names = tuple(dict.fromkeys([*DEFAULT_SERVER_NAMES, *args.server_name]))
    paths = write_certificates(Path(args.out), list(top.site_ids), names, days=args.days, overwrite=args.overwrite,
                               site_keys=args.site_keys)
    # the Flower CLI connection the compose file's coordinator services (enrol-*, run) mount
    (paths.root / "flwr").mkdir(exist_ok=True)
    (paths.root / "flwr" / "config.toml").write_text(top.flower_config())
    print(f"CA and SuperLink certificate ({', '.join(names)}) in {paths.root}; give the sites {paths.ca_cert}")
    usable = True
    for site in top.site_ids:
        status, ok = _site_key_status(paths, site, args.site_keys)
        print(status)
        usable &= ok
    return 0 if usable else 1


def _site_key_status(paths: CertPaths, site: str, made_here: bool) -> tuple[str, bool]:
    """What the coordinator still has to do for one site's key, and whether the keys there are usable."""
    from mome.deploy.certs import check_public_key

    public, signing = paths.site_public_key(site), paths.enrolled_signing_key(site)
    if made_here and paths.site_key(site).exists():
        return (f"  {site}: one-machine trial keys {paths.site_key(site)} and {paths.signing_key(site)} (keep them "
                f"secret); enrol {public}; its replies are checked against {signing}"), True
    if public.exists() and signing.exists():
        try:  # read the fingerprints back to the hospital over the phone: the right keys arrived
            prints = check_public_key(public, "ecdsa"), check_public_key(signing, "ed25519")
        except ValueError as exc:
            return f"  {site}: unusable key: {exc}", False
        return (f"  {site}: enrols {public} ({prints[0]}); its replies are checked against {signing} ({prints[1]}); "
                "compare both fingerprints with the hospital's"), True
    return (f"  {site}: waiting for the hospital's public keys: it runs `mome site-key --out DIR --site-id {site}` "
            f"and sends DIR/auth.key.pub and DIR/sign.key.pub; put them at {public} and {signing}"), True


def compose(args: argparse.Namespace) -> int:
    from mome.deploy.compose import render_compose
    from mome.deploy.topology import Topology

    Path(args.out).write_text(render_compose(Topology.for_compose(args.sites, args.data)))
    top = Topology.build(args.sites)
    print(f"wrote {args.out} (sites {', '.join(top.site_ids)}, data from {args.data}/<site-id>); "
          f"check it with: docker-compose -f {args.out} config -q")
    return 0


def health(args: argparse.Namespace) -> int:
    from mome.deploy.health import health_status

    healthy, found = health_status(args.address, args.timeout)
    print("SERVING" if healthy else f"not serving: {args.address}: {found}")
    return 0 if healthy else 1


def status(args: argparse.Namespace) -> int:
    from mome.server.status import describe, run_status

    found = run_status(Path(args.run))
    print(describe(found))
    return 1 if found.outcome == "failed" else 0


def site_list(text: str) -> int | tuple[str, ...]:
    """`--sites`: a number of sites (site-a, site-b, ...) or their ids, comma-separated."""
    if text.strip().isdigit():
        return int(text)  # 0 is refused by the topology, as one line
    return tuple(s.strip() for s in text.split(",") if s.strip())


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("certs", help="create the CA and the SuperLink TLS certificate (site keys: --site-keys)")
    p.add_argument("--out", required=True, help="folder for the certificates and keys (required; keep private)")
    p.add_argument("--sites", type=site_list, default=3, metavar="N|ID,ID,...",
                   help="the site ids (charite,ucl,...) or their number (site-a, site-b, ...)")
    p.add_argument("--site-keys", action="store_true",
                   help="also make each site's key pair here (one-machine trials only: a hospital makes its own "
                        "with `mome site-key` and sends only auth.key.pub)")
    p.add_argument("--server-name", action="append", default=[],
                   help="extra DNS name or IP of the SuperLink for its certificate (repeatable)")
    p.add_argument("--days", type=int, default=365, help="validity of the certificates")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing CA and the SuperLink key (with --site-keys, every site key too)")
    p.set_defaults(func=certs)

    p = sub.add_parser("compose", help="write docker-compose.yml from the deployment topology (deploy/topology.py)")
    p.add_argument("--sites", type=site_list, default=3, metavar="N|ID,ID,...",
                   help="one worker, SuperNode and SuperExec per site: the site ids, or their number (site-a, ...)")
    p.add_argument("--data", default="./data", help="host folder holding one folder per site (site-a, ...)")
    p.add_argument("--out", default="docker-compose.yml", help="file to write")
    p.set_defaults(func=compose)

    p = sub.add_parser("health", help="exit 0 if a SuperLink/SuperNode/site worker gRPC health service answers SERVING")
    p.add_argument("--address", required=True,
                   help="host:port of a --health-server-address, or unix:///path of a site worker's socket")
    p.add_argument("--timeout", type=float, default=3.0)
    p.set_defaults(func=health)

    p = sub.add_parser("status", help="where a run stands: steps done, sites bound, replied, dropped or refused and "
                                      "why, the last checkpoint (read from the coordinator's outputs)")
    p.add_argument("run", metavar="RUN_DIR", help="the strategy's output folder (e.g. runs/compose/mome), or the "
                                                  "folder above it when it holds one run")
    p.set_defaults(func=status)
