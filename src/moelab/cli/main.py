"""`moelab` entry point: one subcommand per module in this package.

Each subcommand module defines `register(subparsers)` that adds its parser and
sets `func=run` via `set_defaults`; `run(args) -> int | None` does the work by
calling library functions. Errors the user caused (`MoelabError`, `ValueError`,
`OSError`) are printed as one line naming the problem, with exit status 2.

Subcommand modules are imported lazily: ``moelab size ...`` imports only
`moelab.cli.size` (and so never torch); ``moelab --help`` imports them all to list them.
Benchmarks are not a subcommand: run ``python -m benchmarks.moe_layer`` (see BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys

# OpenMP workers that spin while they wait turn a busy machine's every barrier into a wait
# for a descheduled peer: tiny-moe steps ran 5x slower with one competing process (HF's
# Mixtral 3x), and 1.7x with passive waiting (BENCHMARKS.md, "Training on a busy machine").
# The OpenMP runtime reads this once, when torch loads, so it is set before any subcommand
# imports torch; an explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from moelab import __version__  # noqa: E402
from moelab.errors import MoelabError  # noqa: E402

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
    "quantize",
    "generate",
    "serve",
    "playground",
    "bench",
]


def _command_in(argv: list[str]) -> str | None:
    """The subcommand named in `argv` (the first word that is not an option), if known."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in SUBCOMMANDS else None
    return None


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line (flag and value), no usage dump."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser with every subcommand, or with just `only` (the one about to run)."""
    parser = _Parser(
        prog="moelab",
        description="Build, size, train, break, analyse and serve sparse Mixture-of-Experts models.",
        epilog="Benchmarks: python -m benchmarks.moe_layer (and the other scripts in benchmarks/).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"moelab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in [only] if only else SUBCOMMANDS:
        importlib.import_module(f"moelab.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command_in(argv))
    args = parser.parse_args(argv)
    args.argv = argv  # what a command that relaunches itself (`train --nproc`) passes on
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
        print(f"moelab {args.command}: error: {name_flags(str(e), parser, args.command)}", file=sys.stderr)
        return 2


_CONFIG_FIELD = re.compile(r"\b(?:TrainConfig|EngineConfig|DataConfig|LoadConfig|AnalysisConfig)\.(\w+)")


def name_flags(message: str, parser: argparse.ArgumentParser, command: str) -> str:
    """Say ``--steps`` where the library said ``TrainConfig.steps``, when the command has
    that flag: users type flags, not dataclass fields. Other names are left as they are."""
    sub = next((a.choices.get(command) for a in parser._actions if isinstance(a, argparse._SubParsersAction)),
               None)
    flags = set(sub._option_string_actions) if sub is not None else set()

    def swap(m: re.Match) -> str:
        flag = "--" + m.group(1).replace("_", "-")
        return flag if flag in flags else m.group(0)

    return _CONFIG_FIELD.sub(swap, message)


if __name__ == "__main__":
    sys.exit(main())
