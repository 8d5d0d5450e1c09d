"""`moelab demo`: the whole story (size, MoE vs dense, collapse, specialisation, report)."""

from __future__ import annotations

import argparse
import time

from moelab.lab.demo import DemoConfig, run_demo


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="the whole story in ~10 minutes on a laptop CPU (what `make demo` runs)",
        description="Size Mixtral 8x7B against a dense 13B; train the tiny MoE and its matched dense "
        "baselines and compare; run a short routing-collapse experiment; analyse the MoE's expert "
        "specialisation; write runs/demo/report.html.",
    )
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="output folder (default runs/demo)")
    p.add_argument("--steps", type=int, default=None, metavar="N", help="training steps of the comparison")
    p.add_argument("--cache-dir", default=None, metavar="DIR", help="prepared-data cache (default runs/cache/data)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: torch's choice; 1 is faster on a machine busy with other work)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = DemoConfig() if args.steps is None else DemoConfig(compare_steps=args.steps)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    start = time.perf_counter()

    def show(name: str, text: str) -> None:
        print(f"\n=== {name} ({time.perf_counter() - start:.0f} s) ===\n{text}", flush=True)

    result = run_demo(args.out, config=cfg, cache_dir=args.cache_dir, progress=not args.no_progress, on_stage=show)
    print(f"\ndemo done in {time.perf_counter() - start:.0f} s; report: {result.report}")
    return 0
