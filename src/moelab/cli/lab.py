"""`moelab lab NAME`: run a failure-mode experiment (broken vs cured) and print the verdict."""

from __future__ import annotations

import argparse
import json
import sys

from moelab.errors import ConfigError
from moelab.lab.failures import EXPERIMENTS, SCALES, experiment_runs, run_experiment, verdict_table


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "lab",
        help="break MoE training on purpose: collapse, instability, capacity",
        description="Run a small paired experiment (broken vs cured, same seed and data) on the default "
        "corpus, print a verdict table with the measured figures and write plots. See docs/lab.md.",
    )
    p.add_argument("experiment", choices=EXPERIMENTS, metavar="NAME", help=f"one of {', '.join(EXPERIMENTS)}")
    p.add_argument("--out", default=None, metavar="DIR", help="experiment folder (default runs/lab/NAME)")
    p.add_argument("--scale", default="default", choices=sorted(SCALES), help="model/run size (default: default)")
    p.add_argument("--steps", type=int, default=None, metavar="N", help="training steps per run")
    p.add_argument("--runs", nargs="+", default=None, metavar="RUN",
                   help="train only these runs of the experiment (its verdict says what it cannot judge without "
                   "the others)")
    p.add_argument("--seed", type=int, default=None, metavar="N")
    p.add_argument("--data", nargs="+", default=None, metavar="PATH", help="train on these files instead")
    p.add_argument("--cache-dir", default=None, metavar="DIR", help="prepared-data cache (default runs/cache/data)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted experiment in --out: finished runs are kept, an interrupted one "
                   "resumes from its checkpoint, the others run")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="train the runs side by side in N processes, each with a share of the cores (default 1: one "
                   "after the other; docs/train.md 'Side by side')")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moelab.data.loader import prepare_data

    cfg = SCALES[args.scale]
    changes = {k: v for k, v in (("steps", args.steps), ("seed", args.seed)) if v is not None}
    cfg = cfg.with_(**changes)
    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    if args.runs:  # checked before the data is built (run names do not depend on the vocabulary)
        names = [s.name for s in experiment_runs(args.experiment, cfg, vocab_size=512)]
        unknown = [r for r in args.runs if r not in names]
        if unknown:
            raise ConfigError(f"--runs: unknown run(s) {', '.join(unknown)} for {args.experiment}; "
                              f"its runs are {', '.join(names)}")
    data = prepare_data(args.cache_dir, data_paths=args.data)
    out = args.out or f"runs/lab/{args.experiment}"
    from moelab.train import TrainingInterrupted

    try:
        result = run_experiment(args.experiment, data, out, config=cfg, progress=not args.no_progress,
                                resume=args.resume, only=args.runs, workers=args.workers)
    except TrainingInterrupted as e:
        print(f"moelab lab: interrupted in {e.run_dir} at step {e.step}; checkpoint written. To continue, run "
              "the same command with --resume: finished runs are kept", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result.json_summary(), indent=2))
        return 0
    print(f"lab {args.experiment}: {len(result.runs)} runs x {cfg.steps} steps, {result.num_experts} experts "
          f"top-{result.top_k} (uniform share 1/E = {1 / result.num_experts:.3f})")
    print(verdict_table(result))
    print()
    for v in result.verdicts:
        print(f"- {v}")
    print(f"\neffect {'shown as claimed' if result.passed else 'NOT shown at this scale'}; "
          f"plots and experiment.json in {out}")
    return 0
