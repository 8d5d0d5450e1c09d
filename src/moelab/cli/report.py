"""`moelab report RUN_DIR...`: one self-contained HTML report."""

from __future__ import annotations

import argparse

from moelab.lab.report import build_report


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report",
        help="one self-contained HTML report of runs, lab experiments and analyses",
        description="Write a single HTML file (inline CSS, images embedded, no network) with training "
        "curves, expert load over training, failure-mode verdicts, specialisation heatmaps and coloured "
        "text, from run folders, `moelab lab` folders and `moelab analyze` outputs (searched two levels down).",
    )
    p.add_argument("paths", nargs="+", metavar="RUN_DIR", help="run, lab experiment or analysis folders")
    p.add_argument("--out", default="runs/report.html", metavar="FILE", help="output file (default runs/report.html)")
    p.add_argument("--title", default="moelab report")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path = build_report(args.paths, args.out, title=args.title)
    print(path)
    return 0
