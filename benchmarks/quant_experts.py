"""Benchmark: the MoE layer at decode shapes with fp32, bf16, int8 and int4 experts, on CPU.

    python -m benchmarks.quant_experts --threads 2 [--json runs/bench/quant_experts.json]

One `moelab.moe.MoE` per shape; its ``experts`` module is swapped between the variants,
so the router (and so the routing) is the same for all of them:
  - ``fp32``: `RoutedExperts` in float32 (the ``segmented`` backend);
  - ``bf16``: the same experts cast to bf16 (the ``cpu_bf16`` backend);
  - ``int8`` / ``int4``: `moelab.quant.QuantizedExperts` (torch's weight-only CPU kernels on
    bf16 activations; int4 with group size 128);
  - ``int8_dequant`` / ``int4_dequant``: the same, with the kernels switched off (the
    fallback: each used expert dequantised to float32 per call).
Forward only, under `torch.inference_mode`, ``telemetry=False`` (what generation runs).
Timing is interleaved: each round times every variant in turn (median of its calls), and
the table shows the median over rounds, so machine load drifts hit all variants alike.
Expert bytes: the weights each variant keeps resident (int4 includes the kernel's packed
copy, held beside the portable buffers `state_dict` saves).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch

import moelab.quant.experts as qexperts
from benchmarks.common import machine_info, set_threads
from moelab.io import atomic_write_json
from moelab.moe import MoE, MoEConfig
from moelab.quant import QuantFormat, QuantizedExperts

# name: (D, F, E, K)
SHAPES: dict[str, tuple[int, int, int, int]] = {
    "coarse": (512, 1792, 8, 2),
    "fine": (512, 256, 64, 8),
}
TOKENS = (1, 16)
VARIANTS = ("fp32", "bf16", "int8", "int4", "int8_dequant", "int4_dequant")
FORMATS = {"int8": QuantFormat(name="int8"), "int4": QuantFormat(name="int4", group_size=128)}


def _nbytes(experts: torch.nn.Module) -> tuple[int, int]:
    """(saved, resident) bytes of the experts' weights."""
    if isinstance(experts, QuantizedExperts):
        return experts.nbytes(), experts.resident_nbytes()
    n = sum(p.numel() * p.element_size() for p in experts.parameters())
    return n, n


def build(D: int, F: int, E: int, K: int) -> tuple[MoE, dict[str, torch.nn.Module]]:
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=D, d_expert=F, num_experts=E, top_k=K, router="softmax",
                        norm_topk_prob=True)).eval()
    fp32 = moe.experts
    variants: dict[str, torch.nn.Module] = {"fp32": fp32, "bf16": copy.deepcopy(fp32).to(torch.bfloat16)}
    for name, fmt in FORMATS.items():
        variants[name] = QuantizedExperts.from_experts(fp32, fmt)
        variants[f"{name}_dequant"] = variants[name]  # the same module, kernels off
    return moe, variants


def _call(moe: MoE, experts: torch.nn.Module, x: torch.Tensor, kernels: bool) -> Callable[[], object]:
    probe = qexperts.kernel_runs

    def fn() -> object:
        moe.experts = experts
        if not kernels:
            qexperts.kernel_runs = lambda name: False
        try:
            return moe(x, telemetry=False).output
        finally:
            qexperts.kernel_runs = probe

    return fn


def interleaved_ms(fns: dict[str, Callable[[], object]], *, rounds: int, calls: int, warmup: int = 3) -> dict:
    """Median over ``rounds`` of each variant's median per-call time (ms), rounds interleaved."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    per_round: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times = []
            for _ in range(calls):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            per_round[name].append(statistics.median(times) * 1e3)
    return {name: statistics.median(v) for name, v in per_round.items()}


def run(*, rounds: int, calls: int) -> dict:
    results: dict = {"machine": machine_info(), "rows": [], "bytes": {}}
    with torch.inference_mode():
        for shape, (D, F, E, K) in SHAPES.items():
            moe, variants = build(D, F, E, K)
            results["bytes"][shape] = {name: _nbytes(m) for name, m in variants.items() if not name.endswith("_dequant")}
            for T in TOKENS:
                x = torch.randn(T, D)
                fns = {name: _call(moe, variants[name], x, kernels=not name.endswith("_dequant")) for name in VARIANTS}
                ref = fns["fp32"]()
                err = {name: float((fn() - ref).abs().max() / ref.abs().max()) for name, fn in fns.items()}
                ms = interleaved_ms(fns, rounds=rounds, calls=calls)
                for name in VARIANTS:
                    results["rows"].append({"shape": shape, "D": D, "F": F, "E": E, "K": K, "T": T, "variant": name,
                                            "ms": ms[name], "vs_fp32": ms[name] / ms["fp32"],
                                            "rel_err_vs_fp32": err[name]})
    return results


def format_tables(results: dict) -> str:
    lines = ["| shape (D, F, E, K) | T | experts | ms | / fp32 | max rel. err vs fp32 |",
             "|---|---:|---|---:|---:|---:|"]
    for r in results["rows"]:
        lines.append(f"| {r['shape']} ({r['D']}, {r['F']}, {r['E']}, {r['K']}) | {r['T']} | {r['variant']} | "
                     f"{r['ms']:.3f} | {r['vs_fp32']:.2f} | {r['rel_err_vs_fp32']:.1e} |")
    names = list(next(iter(results["bytes"].values())))
    lines += ["", "Expert weights, saved (resident where it differs), and the ratio to fp32:", "",
              "| shape | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for shape, per in results["bytes"].items():
        fp32 = per["fp32"][0]
        cells = [f"{a / 2**20:.1f} MiB ({a / fp32:.3f})" + (f"; {b / 2**20:.1f} MiB ({b / fp32:.3f})" if b != a else "")
                 for a, b in per.values()]
        lines.append(f"| {shape} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=10, help="calls per variant per round")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    for name in FORMATS:
        if not qexperts.kernel_runs(name):
            print(f"note: the {name} kernel does not run here; its rows time the fallback twice")
    results = run(rounds=args.rounds, calls=args.calls)
    m = results["machine"]
    print(f"{m['cpu']}, {m['threads']} threads, torch {m['torch']}, cpu_capability {m['cpu_capability']}, "
          f"load {m['loadavg_1m_5m_15m']}\n")
    print(format_tables(results))
    if args.json:
        atomic_write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
