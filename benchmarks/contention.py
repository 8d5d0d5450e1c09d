"""Benchmark: training step time on a busy machine, ours vs transformers' `MixtralForCausalLM`.

    python -m benchmarks.contention [--competitors 0 1 2] [--model tiny-moe] [--steps 8]
                                    [--budget-s 30] [--json] [--out PATH]

For each number of competitors (0, 1, 2), the benchmark starts that many CPU-bound
processes itself (a Python busy loop each), measures, then stops them. Each measurement
is a fresh subprocess, because ``OMP_WAIT_POLICY`` is read once, when torch's OpenMP
runtime loads: one training step (forward + backward + AdamW, batch 8 x 128, fp32 CPU,
the `benchmarks.train_throughput` setup) is timed after 2 warm-up steps, the median of
``--steps`` steps (fewer when ``--budget-s`` runs out, never fewer than 3).

Variants: ours and HF (its default experts implementation), each with

* ``threads=N, OMP default``: N = all CPUs of the affinity mask, torch's default;
* ``threads=N, OMP passive``: ``OMP_WAIT_POLICY=passive``, idle workers sleep instead of
  spinning;
* ``1 thread, OMP default``: fewer threads instead of a different wait policy.

``moelab train`` runs as the passive rows do: the CLI sets ``OMP_WAIT_POLICY=passive``
unless the environment sets it, and uses the CPUs of the affinity mask and cgroup quota
(`moelab.hardware.available_cpus`). Results: BENCHMARKS.md, "Training on a busy machine".

Each row records the 1-minute load average measured just before it: on a shared machine
the "quiet" baseline is itself only as quiet as the neighbours let it be.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = (
    # (name, impl, threads ("all" | "auto" | int), OMP_WAIT_POLICY or None)
    ("ours, threads=all, OMP default", "ours", "all", None),
    ("ours, threads=all, OMP passive", "ours", "all", "passive"),
    ("ours, 1 thread, OMP default", "ours", "1", None),
    ("HF, threads=all, OMP default", "hf", "all", None),
    ("HF, threads=all, OMP passive", "hf", "all", "passive"),
    ("HF, 1 thread, OMP default", "hf", "1", None),
)

SPIN = "import signal, sys\nsignal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\nwhile True:\n    pass\n"


def child(impl: str, threads: str, model_name: str, steps: int, budget_s: float) -> dict:
    """One measurement, in this (fresh) process."""
    import torch

    from benchmarks.train_throughput import _hf_step, _step_fn, build_hf
    from moelab import hardware
    from moelab.model import Transformer, get_preset

    n = hardware.available_cpus() if threads == "all" else int(threads)
    torch.set_num_threads(n)
    cfg = get_preset(model_name)
    torch.manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (8, 129))
    if impl == "ours":
        step = _step_fn(Transformer(cfg).train(), x[:, :-1].contiguous(), x[:, 1:].contiguous(), return_logits=False)
    else:
        step = _hf_step(build_hf(cfg, "grouped_mm"), x)
    for _ in range(2):
        step()
    times: list[float] = []
    t_start = time.perf_counter()
    while len(times) < steps and (len(times) < 3 or time.perf_counter() - t_start < budget_s):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"threads": n, "step_ms": statistics.median(times) * 1e3, "min_step_ms": min(times) * 1e3,
            "steps": len(times), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}


def _measure(impl: str, threads: str, policy: str | None, args: argparse.Namespace) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    cmd = [sys.executable, "-m", "benchmarks.contention", "--child", impl, "--threads", threads,
           "--model", args.model, "--steps", str(args.steps), "--budget-s", str(args.budget_s)]
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.budget_s * 4 + 120)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}",
                "load_avg_1m": load}
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row["load_avg_1m"] = load
    return row


def run(args: argparse.Namespace) -> dict:
    from moelab import hardware

    results: dict[str, dict[str, dict]] = {}
    for n in args.competitors:
        spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(n)]
        try:
            time.sleep(1.0)  # let the scheduler see them
            rows = {}
            for name, impl, threads, policy in VARIANTS:
                rows[name] = _measure(impl, threads, policy, args)
                print(f"competitors={n}  {name:34s} {json.dumps(rows[name])}", file=sys.stderr, flush=True)
            results[str(n)] = rows
        finally:
            for p in spinners:
                p.terminate()
            for p in spinners:
                p.wait(timeout=10)
    quiet = results.get("0", {})
    for rows in results.values():
        for name, row in rows.items():
            base = quiet.get(name, {}).get("step_ms")
            if base and "step_ms" in row:
                row["vs_quiet"] = row["step_ms"] / base
    return {
        "benchmark": "contention",
        "model": args.model,
        "batch_size": 8,
        "seq_len": 128,
        "available_cpus": hardware.available_cpus(),
        "cpu_quota": hardware.cpu_quota(),
        "results": results,
    }


def table(report: dict) -> str:
    names = [v[0] for v in VARIANTS]
    loads = list(report["results"])
    head = "| variant | " + " | ".join(f"{n} competitor(s): ms/step (x quiet) [load]" for n in loads) + " |"
    lines = [head, "|---|" + "---|" * len(loads)]
    for name in names:
        cells = []
        for n in loads:
            r = report["results"][n].get(name, {})
            if "step_ms" not in r:
                cells.append(f"error: {r.get('error', '?')[:40]}")
                continue
            ratio = f" ({r['vs_quiet']:.2f}x)" if "vs_quiet" in r and n != "0" else ""
            cells.append(f"{r['step_ms']:.0f}{ratio} [{r['load_avg_1m']:.1f}], {r['threads']} thr")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--competitors", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--model", default="tiny-moe")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--budget-s", type=float, default=30.0)
    p.add_argument("--threads", default="all")
    p.add_argument("--child", choices=["ours", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.threads, args.model, args.steps, args.budget_s)))
        return 0
    report = run(args)
    if args.out:
        from moelab.io import atomic_write_json

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.out, report)
    print(json.dumps(report, indent=2) if args.json else table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
