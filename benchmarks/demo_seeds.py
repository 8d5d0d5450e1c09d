"""Benchmark: the demo's comparison over seeds, exactly as `moelab demo` trains it.

    python -m benchmarks.demo_seeds --seeds 0 1 [--threads 1] [--out runs/bench/demo-seeds] [--json] [--steps N]

`moelab.lab.demo.demo_models` and `demo_train_config` (the demo's presets and
`TrainConfig`, nothing re-typed here) through `moelab.train.compare.compare_seeds`: per
seed the demo's MoE, its dense twin and the Mixtral-style top-2 MoE on the same batches.
Prints the seeds' trade-off table (val loss, steps to the dense model's final val loss per
seed, quality per TFLOP and per MiB) and writes ``OUT/demo_seeds.json``. Steps and losses
do not depend on machine load; the wall time does.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

from benchmarks.common import machine_info, set_threads
from moelab.data import prepare_data
from moelab.io import atomic_write_json
from moelab.lab.demo import DemoConfig, demo_models, demo_train_config
from moelab.train.compare import compare_seeds, render_seeds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--steps", type=int, default=None, help="override the demo's steps (a smoke run)")
    p.add_argument("--out", default="runs/bench/demo-seeds")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--overwrite", action="store_true", help="replace runs already in --out")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    threads = set_threads(args.threads)
    cfg = DemoConfig() if args.steps is None else DemoConfig(compare_steps=args.steps)
    models = demo_models(cfg)
    data = prepare_data(args.cache_dir, vocab_size=models["moe"][1].vocab_size)
    t0 = time.perf_counter()
    res = compare_seeds(models, demo_train_config(cfg), data, args.out, args.seeds, progress=False,
                        overwrite=args.overwrite, tensorboard=False)
    wall = time.perf_counter() - t0
    out = {"benchmark": "demo_seeds", "threads": threads, "wall_s": wall, "machine": machine_info(),
           "models": {role: name for role, (name, _) in models.items()}, **res.to_dict()}
    atomic_write_json(f"{args.out}/demo_seeds.json", out)
    print(json.dumps(out, indent=2) if args.json else render_seeds(res) + f"\nwall time: {wall:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
