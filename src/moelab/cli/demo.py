"""`moelab demo`: the whole story (size, MoE vs dense, collapse, specialisation, report)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace

from moelab.errors import ConfigError
from moelab.lab.demo import DemoConfig, demo_json, run_demo


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="the whole story in ~6 minutes on 2 CPU cores (what `make demo` runs)",
        description="Size Mixtral 8x7B against a dense 13B; train the fine-grained + shared MoE, its "
        "matched-compute dense twin and a Mixtral-style top-2 MoE on the same batches and compare them "
        "(quality per FLOP and per byte of weights); run a short routing-collapse experiment; analyse the "
        "MoE's expert specialisation; write runs/demo/report.html.",
    )
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="output folder (default runs/demo)")
    p.add_argument("--steps", type=int, default=None, metavar="N", help="training steps of the comparison")
    p.add_argument("--cache-dir", default=None, metavar="DIR", help="prepared-data cache (default runs/cache/data)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads in all (default: the cores); the models train side by side in one worker "
                   "process per thread unless --workers says otherwise")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="train the compared models and the collapse runs in N processes side by side, each with "
                   "a share of --threads (default: one per thread; 1: one after the other in this process)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true",
                   help="print the demo's figures as one JSON object on stdout (stage output goes to stderr; "
                   "keys in docs/train.md, 'The demo')")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = DemoConfig()
    if args.steps is not None:
        if args.steps < 1:
            raise ConfigError(f"--steps must be >= 1, got {args.steps}")
        cfg = replace(cfg, compare_steps=args.steps)
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    if args.workers is not None:
        if args.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {args.workers}")
        cfg = replace(cfg, workers=args.workers)
    start = time.perf_counter()
    # With --json, stdout carries the one JSON object and nothing else.
    stage_out = sys.stderr if args.json else sys.stdout

    def show(name: str, text: str) -> None:
        print(f"\n=== {name} ({time.perf_counter() - start:.0f} s) ===\n{text}", file=stage_out, flush=True)

    result = run_demo(args.out, config=cfg, cache_dir=args.cache_dir, progress=not args.no_progress, on_stage=show,
                      threads=args.threads)
    print(f"\ndemo done in {time.perf_counter() - start:.0f} s; report: {result.report}", file=stage_out)
    if args.json:
        print(json.dumps(demo_json(result), indent=2, allow_nan=False))
    return 0
