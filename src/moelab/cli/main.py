"""`moelab` entry point: one subcommand per module in this package.

Each subcommand module defines `register(subparsers)` that adds its parser and
sets `func=run` via `set_defaults`; `run(args) -> int | None` does the work by
calling library functions. Errors the user caused (`MoelabError`, `ValueError`,
`OSError`) are printed as one line naming the problem, with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from moelab.errors import MoelabError

# Order is the order shown in `moelab --help`.
SUBCOMMANDS = [
    "size",
    "train",
    "compare",
    "lab",
    "analyze",
    "report",
    "demo",
    "convert",
    "generate",
    "bench",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moelab",
        description="Build, size, train, break, analyse and serve sparse Mixture-of-Experts models.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"moelab.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"moelab.cli.{name}":
                continue  # subcommand not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("moelab: interrupted", file=sys.stderr)
        return 130
    except (MoelabError, ValueError, OSError) as e:
        if os.environ.get("MOELAB_TRACEBACK"):
            raise
        print(f"moelab {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
