"""Benchmark: fp32 vs bf16 autocast training steps of the demo's models, side by side.

    python -m benchmarks.demo_precision [--threads 2] [--batch-size 16] [--seq-len 128] [--json]

One training step (forward, backward, AdamW; batch fetch excluded) of each demo model
(`moelab.lab.demo.DEMO_MODELS`), fp32 and under bf16 autocast, *interleaved* in one
process (model A fp32, A bf16, B fp32, ... repeated), median of the timed steps. This
decides whether `TrainConfig.precision="auto"` (bf16 on CPUs with native bf16) buys the
demo more tokens in its minutes; BENCHMARKS.md records the table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch

from benchmarks.common import machine_info, set_threads
from moelab.lab.demo import DEMO_MODELS
from moelab.model import Transformer, get_preset
from moelab.train import TrainConfig
from moelab.train.trainer import build_optimizer


def step_times(presets: dict[str, str], batch_size: int, seq_len: int, steps: int = 12,
               warmup: int = 3) -> dict[str, dict[str, float]]:
    """{preset: {"fp32": s, "bf16": s}}: median seconds per training step, interleaved."""
    torch.manual_seed(0)
    cfg = TrainConfig(batch_size=batch_size, seq_len=seq_len)
    runners = {}
    for name in presets.values():
        model_cfg = get_preset(name)
        x = torch.randint(0, model_cfg.vocab_size, (batch_size, seq_len + 1))
        for precision in ("fp32", "bf16"):
            torch.manual_seed(0)
            model = Transformer(model_cfg).train()
            opt = build_optimizer(model, cfg)

            def step(model=model, opt=opt, x=x, precision=precision) -> None:
                ctx = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16"
                       else contextlib.nullcontext())
                with ctx:
                    loss = model(x[:, :-1], targets=x[:, 1:]).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            runners[(name, precision)] = step
    times: dict[tuple[str, str], list[float]] = {k: [] for k in runners}
    for i in range(warmup + steps):
        for key, fn in runners.items():
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                times[key].append(time.perf_counter() - t0)
    out: dict[str, dict[str, float]] = {}
    for (name, precision), ts in times.items():
        out.setdefault(name, {})[precision] = statistics.median(ts)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=12, help="timed steps per model and precision")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    threads = set_threads(args.threads)
    res = step_times(DEMO_MODELS, args.batch_size, args.seq_len, steps=args.steps)
    if args.json:
        print(json.dumps({"benchmark": "demo_precision", "threads": threads, "batch_size": args.batch_size,
                          "seq_len": args.seq_len, "machine": machine_info(), "step_s": res}, indent=2))
        return 0
    print(f"batch {args.batch_size} x {args.seq_len}, {threads} threads, median s/step (interleaved)")
    print("| model | fp32 s/step | bf16 autocast s/step | fp32 / bf16 |\n|---|---|---|---|")
    for name, t in res.items():
        print(f"| {name} | {t['fp32']:.3f} | {t['bf16']:.3f} | {t['fp32'] / t['bf16']:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
