"""A hospital's commands: check its data folder, segment cases with a model bundle."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.config import Config


def check_data(args: argparse.Namespace) -> int:
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


def predict(args: argparse.Namespace) -> int:
    from client.predict import predict as segment
    from common.sitedata import SiteDataError

    try:
        written, problems = segment(Path(args.model), [Path(p) for p in args.input], Path(args.out))
    except (OSError, ValueError, SiteDataError) as exc:  # a missing bundle, misnamed inputs, a bad dataset.json
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    for problem in problems:
        print(f"skipped {problem}", file=sys.stderr)
    return 0 if written else 1


def add_commands(sub: argparse._SubParsersAction) -> None:
    defaults = Config()
    p = sub.add_parser("check-data", help="validate site folders; exit 1 if a site has no usable case")
    p.add_argument("site_dirs", nargs="+", type=Path, metavar="SITE_DIR")
    p.add_argument("--modalities", default=defaults.modalities)
    p.add_argument("--clinical-fields", default=defaults.clinical_fields)
    p.add_argument("--size", type=int, default=defaults.size)
    p.set_defaults(func=check_data)

    p = sub.add_parser("predict", help="write NIfTI segmentations with a saved model bundle")
    p.add_argument("--model", required=True, help="bundle folder (e.g. <run>/mome/sites/<site>/model)")
    p.add_argument("--input", required=True, nargs="+",
                   help="a site folder, or files/folders of <case>_<cccc>.nii.gz (cccc = modality index)")
    p.add_argument("--out", required=True, help="folder for <case>.nii.gz")
    p.set_defaults(func=predict)
