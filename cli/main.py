"""`mome`: the parser, assembled from each user's commands."""

from __future__ import annotations

import argparse
import sys

from mome.cli import coordinator, developer, hospital


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mome", description="Federated Mixture of Multicenter Experts.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for user in (hospital, coordinator, developer):
        user.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
