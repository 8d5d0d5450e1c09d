"""`moelab compare`: train an MoE and its dense baselines on the same tokens and compare.

Thin layer over `moelab.train.compare`. See docs/train.md for the conventions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moelab.cli.train import (
    add_training_arguments,
    load_data,
    resolve_model,
    train_config_from_args,
    with_loss_coefs,
)
from moelab.errors import ConfigError
from moelab.model import PRESETS
from moelab.train import TrainingInterrupted
from moelab.train.compare import compare, compare_seeds, render_seeds, render_table


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compare",
        help="MoE vs dense: same token stream, same steps; params, FLOPs, speed, loss",
        description="Train an MoE, the dense model with its active FFN width, and the dense model with its "
        "total FFN width on the same token stream; print parameters, FLOPs per token, tokens/s, validation "
        "loss (overall and per domain) and the steps the MoE needs to reach the dense model's final loss.",
    )
    p.add_argument("--moe", default="tiny-moe", metavar="PRESET_OR_JSON", help="the MoE model (default tiny-moe)")
    p.add_argument("--dense", default=None, metavar="PRESET_OR_JSON",
                   help="dense model with the MoE's active width (default: the MoE preset's '-dense' sibling)")
    p.add_argument("--dense-total", default=None, metavar="PRESET_OR_JSON",
                   help="dense model with the MoE's total width (default: the '-dense-total' sibling; "
                   "'none' to skip)")
    p.add_argument("--out", default="runs/compare", metavar="DIR", help="one run directory per model under DIR")
    p.add_argument("--seeds", type=int, default=1, metavar="N",
                   help="repeat over N seeds (--seed, --seed+1, ...; runs under DIR/seed-<s>/) and report the "
                   "mean and spread (default 1: one run, under DIR)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted comparison in --out: finished runs are kept, the unfinished one "
                   "resumes from its checkpoint (same flags as the first time)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="train the models side by side in N processes, each with a share of --threads (default 1: "
                   "one after the other in this process; small models train faster as one 1-thread process per "
                   "core, docs/train.md)")
    add_training_arguments(p)
    p.set_defaults(func=run)


def _sibling(moe_name: str, suffix: str) -> str | None:
    if moe_name.endswith("-moe"):
        name = moe_name[: -len("-moe")] + suffix
        if name in PRESETS:
            return name
    return None


def run(args: argparse.Namespace) -> int:
    dense_name = args.dense or _sibling(args.moe, "-dense")
    if dense_name is None:
        raise ConfigError(f"--dense is required: {args.moe!r} has no '-dense' preset sibling")
    total_name = args.dense_total if args.dense_total is not None else _sibling(args.moe, "-dense-total")
    if total_name is not None and total_name.lower() == "none":
        total_name = None
    models = {"moe": args.moe, "dense": dense_name}
    if total_name:
        models["dense_total"] = total_name
    configs = {role: (Path(name).stem, with_loss_coefs(resolve_model(name), args)) for role, name in models.items()}
    vocab = {cfg.vocab_size for _, cfg in configs.values()}
    if len(vocab) != 1:
        raise ConfigError(f"the compared models must share one vocab_size (one tokenizer), got {sorted(vocab)}")
    if configs["moe"][1].moe is None:
        raise ConfigError(f"--moe {args.moe!r} is a dense model (its config has no 'moe' section)")
    if args.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {args.seeds}")
    if args.resume and args.overwrite:
        raise ConfigError("--resume keeps the finished runs, --overwrite replaces them: choose one")
    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    train_cfg = train_config_from_args(args)
    data = load_data(args, vocab.pop())
    kwargs = dict(progress=not args.no_progress, overwrite=args.overwrite, tensorboard=not args.no_tensorboard,
                  resume=args.resume, workers=args.workers, threads=args.threads)
    try:
        return _run(args, configs, train_cfg, data, kwargs)
    except TrainingInterrupted as e:
        print(f"moelab compare: interrupted in {e.run_dir} at step {e.step}; checkpoint written. To continue, run "
              "the same command with --resume (and without --overwrite): finished runs are kept", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace, configs: dict, train_cfg, data, kwargs: dict) -> int:
    if args.seeds > 1:
        seeds = compare_seeds(configs, train_cfg, data, args.out,
                              [train_cfg.seed + i for i in range(args.seeds)], **kwargs)
        print(json.dumps(seeds.to_dict(), indent=2) if args.json else render_seeds(seeds))
        return 0
    result = compare(configs, train_cfg, data, args.out, **kwargs)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(render_table(result))
    return 0
