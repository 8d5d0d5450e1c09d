"""Benchmark: the MoE-vs-dense comparison at the default scale, plus side-by-side step times.

    python -m benchmarks.compare [--steps 300] [--threads 1] [--out runs/bench/compare] [--json]

1. Runs `moelab.train.compare` (tiny-moe, tiny-dense, tiny-dense-total; default corpus;
   default `TrainConfig` unless overridden) and records its result, including the wall time.
   The steps-to-dense-loss ratio comes from the loss curves, which do not depend on
   machine load.
2. Seconds per training step (batch fetch excluded: forward + backward + AdamW, same batch
   shape) of the three models, *interleaved* in one process (moe, dense, dense-total,
   moe, ...), median of the timed steps. The runs of step 1 are sequential, so their
   tokens/s ratio drifts with the load of a shared machine; this one does not.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import time

import torch

from benchmarks.common import machine_info, set_threads
from moelab.data import prepare_data
from moelab.io import atomic_write_json
from moelab.model import Transformer, get_preset
from moelab.train import TrainConfig
from moelab.train.compare import compare, render_table
from moelab.train.trainer import build_optimizer

log = logging.getLogger("benchmarks.compare")

MODELS = {"moe": "tiny-moe", "dense": "tiny-dense", "dense_total": "tiny-dense-total"}


def interleaved_step_times(train_cfg: TrainConfig, vocab: int, steps: int = 15, warmup: int = 3) -> dict:
    torch.manual_seed(0)
    x = torch.randint(0, vocab, (train_cfg.batch_size, train_cfg.seq_len + 1))
    inputs, targets = x[:, :-1], x[:, 1:]
    runners = {}
    for role, name in MODELS.items():
        model = Transformer(get_preset(name)).train()
        opt = build_optimizer(model, train_cfg)

        def step(model=model, opt=opt) -> None:
            model(inputs, targets=targets).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        runners[role] = step
    times: dict[str, list[float]] = {r: [] for r in runners}
    for i in range(warmup + steps):
        for role, fn in runners.items():
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                times[role].append(time.perf_counter() - t0)
    med = {r: statistics.median(t) for r, t in times.items()}
    return {
        "step_s": med,
        "moe_over_dense": med["moe"] / med["dense"],
        "dense_total_over_dense": med["dense_total"] / med["dense"],
        "steps": steps,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help="training steps (default: TrainConfig's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--out", default="runs/bench/compare")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.add_argument("--skip-training", action="store_true", help="only the interleaved step times")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    threads = set_threads(args.threads)
    cfg = TrainConfig(num_threads=threads)
    if args.steps:
        cfg = dataclasses.replace(cfg, steps=args.steps)
    vocab = get_preset(MODELS["moe"]).vocab_size
    result: dict = {"benchmark": "compare", "threads": threads, "machine": machine_info()}
    if not args.skip_training:
        data = prepare_data(args.cache_dir, vocab_size=vocab)
        t0 = time.perf_counter()
        cmp = compare({r: (n, get_preset(n)) for r, n in MODELS.items()}, cfg, data, args.out, progress=False,
                      overwrite=True)
        result["wall_s"] = time.perf_counter() - t0
        result["compare"] = cmp.to_dict()
        print(render_table(cmp))
        print(f"wall time: {result['wall_s']:.0f} s")
    result["interleaved"] = interleaved_step_times(cfg, vocab)
    il = result["interleaved"]
    print("interleaved s/step: " + "  ".join(f"{r} {t:.3f}" for r, t in il["step_s"].items())
          + f"  -> moe/dense {il['moe_over_dense']:.2f}x")
    atomic_write_json(f"{args.out}/benchmark.json", result)
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
