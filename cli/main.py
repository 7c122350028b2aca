"""`mome`: the parser, assembled from each user's commands."""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from mome.cli import coordinator, developer, hospital
from mome.common.config import package_version


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mome", description="Federated Mixture of Multicenter Experts.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for user in (hospital, coordinator, developer):
        user.add_commands(sub)
    _show_defaults(parser)
    return parser


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Every command's --help lists its defaults."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                command.formatter_class = argparse.ArgumentDefaultsHelpFormatter
                _show_defaults(command)


def _quiet_libraries() -> None:
    """Deprecation notices of torch, Ray and Flower are for their users' code, not for this tool's: off in this
    process and in the ones it starts (simulation actors, deployment processes), unless MOME_DEBUG is set."""
    if os.environ.get("MOME_DEBUG"):
        return
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning,ignore::FutureWarning")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # Ray's notice about GPU env vars: no GPU used


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 1 the work failed (a strategy, a site without a usable case), 2 bad input (flags, files,
    config), 130 interrupted. Bad input is one line on stderr, no traceback (MOME_DEBUG=1 shows it)."""
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        return args.func(args)
    except ValueError as exc:
        if os.environ.get("MOME_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `mome audit ... | head`: the reader has gone, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
