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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
