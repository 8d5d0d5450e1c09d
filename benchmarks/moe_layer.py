"""Benchmark: our MoE layer vs HF transformers' Mixtral MoE block vs a dense FFN, on CPU.

    python -m benchmarks.moe_layer --json runs/bench/moe_layer.json [--quick]

For each shape and pass (forward; forward+backward) it times, in one process:
  - ``ours``: `moelab.moe.MoE` fast path (router + experts, softmax top-k renormalised,
    i.e. Mixtral routing, no shared experts);
  - ``hf_<impl>``: `MixtralSparseMoeBlock` with each experts implementation of
    transformers 5.x (``eager``, ``batched_mm``, ``grouped_mm``), same weights, so the
    same routing (checked: max |ours - hf_eager| is recorded);
  - ``dense``: a SwiGLU FFN of hidden K*F (the same active FLOPs);
  - a square fp32 GEMM, for this machine's peak.

``--dtypes float32 bfloat16`` (the default) repeats the whole comparison in bf16: every
contender's weights and input cast to bf16, so ours runs the ``cpu_bf16`` experts
backend (bf16 GEMMs where the CPU has native bf16: AMX-BF16 or AVX512-BF16, see
`moelab.hardware`) against HF's implementations in the same dtype, and the table adds
ours fp32 / ours bf16, measured in the same process.

Forward runs under ``torch.no_grad()`` (inference); forward+backward back-propagates a
fixed random output gradient into the input and all weights. Expert FLOPs counted:
2*T*K*D*3F forward (gate_up is 2F x D, down is D x F), three times that for fwd+bwd;
router, softmax and gather/scatter are not counted.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.common import gemm_peak_gflops, machine_info, set_threads, time_ms
from moelab.io import atomic_write_json
from moelab.moe import FeedForward, MoE, MoEConfig

log = logging.getLogger("benchmarks.moe_layer")

# name: (D, F, E, K, T)
SHAPES: dict[str, tuple[int, int, int, int, int]] = {
    "coarse": (512, 1792, 8, 2, 4096),
    "fine": (512, 256, 64, 8, 4096),
    "very_fine": (512, 128, 128, 8, 2048),
    "decode": (512, 1792, 8, 2, 16),
    "decode_fine": (512, 256, 64, 8, 16),
}
FINE_GRAINED = ("fine", "very_fine", "decode_fine")
COMPUTE_BOUND = ("coarse",)
HF_IMPLS = ("eager", "batched_mm", "grouped_mm")
BATCHED_MM_MAX_BYTES = 2 * 2**30  # batched_mm gathers one weight copy per (token, expert)
PASSES = ("forward", "forward_backward")


def expert_flops(D: int, F: int, K: int, T: int, pass_: str) -> float:
    """Routed-expert FLOPs: per (token, expert) a [2F x D] and a [D x F] matvec, 2 FLOPs per MAC.

    Forward = 2*T*K*D*3F; backward = 2x forward (grad wrt input and wrt weight).
    """
    fwd = 2.0 * T * K * D * 3 * F
    return fwd if pass_ == "forward" else 3 * fwd


def build_ours(D: int, F: int, E: int, K: int) -> MoE:
    cfg = MoEConfig(
        d_model=D, d_expert=F, num_experts=E, top_k=K, router="softmax", norm_topk_prob=True
    )
    return MoE(cfg)


def build_hf(ours: MoE, impl: str) -> torch.nn.Module:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    c = ours.cfg
    config = MixtralConfig(
        hidden_size=c.d_model,
        intermediate_size=c.d_expert,
        num_local_experts=c.num_experts,
        num_experts_per_tok=c.top_k,
        router_jitter_noise=0.0,
        hidden_act="silu",
    )
    config._experts_implementation = impl
    block = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        block.gate.weight.copy_(ours.router.weight)
        block.experts.gate_up_proj.copy_(ours.experts.gate_up_proj)
        block.experts.down_proj.copy_(ours.experts.down_proj)
    return block


def _runner(
    module: torch.nn.Module, x: torch.Tensor, pass_: str, call: Callable
) -> Callable[[], object]:
    params = list(module.parameters())
    if pass_ == "forward":

        def run() -> object:
            with torch.no_grad():
                return call(x)

        return run
    xg = x.detach().clone().requires_grad_(True)
    grad_out = torch.randn_like(x)

    def run_bwd() -> object:
        for p in params:
            p.grad = None
        xg.grad = None
        call(xg).backward(grad_out)
        return None

    return run_bwd


def bench_shape(
    name: str, D: int, F: int, E: int, K: int, T: int, *, budget_s: float, peak: float,
    dtype: torch.dtype = torch.float32,
) -> dict:
    torch.manual_seed(0)
    ours = build_ours(D, F, E, K)
    # Larger init than the training default so the router is not near-uniform (ties).
    ours.reset_parameters(std=0.05)
    x = torch.randn(1, T, D)
    dense = FeedForward(D, K * F)
    hf = {impl: build_hf(ours, impl) for impl in HF_IMPLS}
    if dtype != torch.float32:
        ours, dense, x = ours.to(dtype), dense.to(dtype), x.to(dtype)
        hf = {impl: m.to(dtype) for impl, m in hf.items()}

    with torch.no_grad():
        ref = ours(x).output
        parity = {
            impl: float((ref - m(x)).abs().max())
            for impl, m in hf.items()
            if _fits(impl, D, F, K, T)
        }

    calls: dict[str, tuple[torch.nn.Module, Callable]] = {"ours": (ours, lambda t: ours(t).output)}
    for impl, m in hf.items():
        calls[f"hf_{impl}"] = (m, m)
    calls["dense"] = (dense, dense)

    result: dict = {
        "shape": {"D": D, "F": F, "E": E, "K": K, "T": T},
        "dtype": str(dtype).removeprefix("torch."),
        "experts_backend": ours.experts.backend(x.reshape(-1, D)).name,
        "max_abs_diff_vs_hf": parity,
        "passes": {},
    }
    for pass_ in PASSES:
        rows: dict[str, dict] = {}
        for label, (module, call) in calls.items():
            impl = label.removeprefix("hf_")
            if label.startswith("hf_") and not _fits(impl, D, F, K, T):
                need = T * K * 3 * F * D * 4 / 2**30
                rows[label] = {
                    "ran": False,
                    "reason": f"batched_mm would gather {need:.1f} GiB of per-token expert weights",
                }
                continue
            try:
                t = time_ms(_runner(module, x, pass_, call), budget_s=budget_s)
                rows[label] = {"ran": True, **t}
            except (
                Exception
            ) as exc:  # an implementation that does not run here is a result, not a crash
                rows[label] = {
                    "ran": False,
                    "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
                }
        flops = expert_flops(D, F, K, T, pass_)
        for row in rows.values():
            if row["ran"]:
                row["gflops"] = flops / row["median_ms"] / 1e6
        hf_ran = {k: v["median_ms"] for k, v in rows.items() if k.startswith("hf_") and v["ran"]}
        best = min(hf_ran, key=hf_ran.get) if hf_ran else None
        ours_ms = rows["ours"]["median_ms"]
        achieved = flops / ours_ms / 1e6
        result["passes"][pass_] = {
            "ms": rows,
            "hf_best": best,
            "hf_best_ms": hf_ran.get(best) if best else None,
            "ours_ms": ours_ms,
            "hf_best_ms / ours_ms": hf_ran[best] / ours_ms if best else None,
            "dense_ms / ours_ms": rows["dense"]["median_ms"] / ours_ms
            if rows["dense"]["ran"]
            else None,
            "expert_gflop": flops / 1e9,
            "achieved_gflops": achieved,
            "achieved_gflops / gemm_peak_gflops": achieved / peak,
        }
    return result


def _fits(impl: str, D: int, F: int, K: int, T: int) -> bool:
    return impl != "batched_mm" or T * K * 3 * F * D * 4 <= BATCHED_MM_MAX_BYTES


def targets(results: dict) -> dict:
    """The three claims this benchmark checks (fp32), evaluated on the measured numbers,
    and the bf16 one: ours in bf16 >= HF's best in bf16."""
    out = {}
    for name, r in results.get("shapes_bf16", {}).items():
        for pass_, p in r["passes"].items():
            ratio = p["hf_best_ms / ours_ms"]
            out[f"bf16 {name}/{pass_}: ours >= 1.0x hf_best"] = None if ratio is None else bool(ratio >= 1.0)
    for name, r in results["shapes"].items():
        for pass_, p in r["passes"].items():
            ratio = p["hf_best_ms / ours_ms"]
            need = 1.5 if name in FINE_GRAINED else 1.0
            out[f"{name}/{pass_}: ours >= {need}x hf_best"] = (
                None if ratio is None else bool(ratio >= need)
            )
            if name in COMPUTE_BOUND:
                out[f"{name}/{pass_}: >= 80% of GEMM peak"] = bool(
                    p["achieved_gflops / gemm_peak_gflops"] >= 0.8
                )
    return out


def format_bf16_table(results: dict) -> str:
    """bf16 rows: ours vs HF's implementations in bf16, and ours fp32 / ours bf16."""
    cols = ["ours", *(f"hf_{i}" for i in HF_IMPLS), "dense"]
    head = f"| shape | pass | {' | '.join(c + ' ms' for c in cols)} | hf_best/ours | ours fp32/bf16 | GF/s |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in results["shapes_bf16"].items():
        for pass_, p in r["passes"].items():
            cells = [f"{p['ms'][c]['median_ms']:.1f}" if p["ms"][c]["ran"] else "n/a" for c in cols]
            ratio = p["hf_best_ms / ours_ms"]
            fp32 = results["shapes"].get(name, {}).get("passes", {}).get(pass_)
            speedup = f"{fp32['ours_ms'] / p['ours_ms']:.2f}x" if fp32 else "n/a"
            lines.append(
                f"| {name} | {'fwd' if pass_ == 'forward' else 'fwd+bwd'} | {' | '.join(cells)} | "
                f"{'n/a' if ratio is None else f'{ratio:.2f}x'} | {speedup} | {p['achieved_gflops']:.0f} |"
            )
    return "\n".join(lines)


def format_table(results: dict, key: str = "shapes") -> str:
    cols = ["ours", *(f"hf_{i}" for i in HF_IMPLS), "dense"]
    head = (
        f"| shape | pass | {' | '.join(c + ' ms' for c in cols)} | hf_best/ours | GF/s | % peak |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in results[key].items():
        for pass_, p in r["passes"].items():
            cells = []
            for c in cols:
                row = p["ms"][c]
                cells.append(f"{row['median_ms']:.1f}" if row["ran"] else "n/a")
            ratio = p["hf_best_ms / ours_ms"]
            lines.append(
                f"| {name} | {'fwd' if pass_ == 'forward' else 'fwd+bwd'} | {' | '.join(cells)} | "
                f"{'n/a' if ratio is None else f'{ratio:.2f}x'} | {p['achieved_gflops']:.0f} | "
                f"{100 * p['achieved_gflops / gemm_peak_gflops']:.0f}% |"
            )
    notes = sorted(
        {
            f"{c}: {row['reason']}"
            for r in results["shapes"].values()
            for p in r["passes"].values()
            for c, row in p["ms"].items()
            if not row["ran"]
        }
    )
    return "\n".join(lines + ([""] + [f"- n/a {n}" for n in notes] if notes else []))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--json",
        type=Path,
        default=Path("runs/bench/moe_layer.json"),
        help="where to write results",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: T/16, few repeats, small GEMM"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="intra-op threads (default: all available)"
    )
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"],
                        help="run the comparison in these dtypes (default both; float32 is always run "
                             "first when bfloat16 is asked, for the fp32/bf16 ratio)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    threads = set_threads(args.threads)
    budget = 0.2 if args.quick else 2.0
    peak = gemm_peak_gflops((512, 1024) if args.quick else (1024, 2048, 4096), budget_s=budget)
    log.info(
        "threads=%d  GEMM peak %.1f GF/s  %s",
        threads,
        peak["peak_gflops"],
        {k: round(v["gflops"], 1) for k, v in peak["per_size"].items()},
    )
    from moelab import hardware

    results: dict = {"machine": machine_info(), "quick": args.quick, "gemm": peak, "shapes": {},
                     "cpu_native_bf16": hardware.cpu_native_bf16()}
    dtypes = [torch.float32] + ([torch.bfloat16] if "bfloat16" in args.dtypes else [])
    if "bfloat16" in args.dtypes:
        results["shapes_bf16"] = {}
    for name in args.shapes:
        D, F, E, K, T = SHAPES[name]
        if args.quick:
            T = max(16, T // 16) if T > 16 else T
        for dtype in dtypes:
            log.info("shape %s: D=%d F=%d E=%d K=%d T=%d %s", name, D, F, E, K, T, dtype)
            key = "shapes" if dtype == torch.float32 else "shapes_bf16"
            results[key][name] = bench_shape(
                name, D, F, E, K, T, budget_s=budget, peak=peak["peak_gflops"], dtype=dtype
            )
    results["targets"] = targets(results)
    results["loadavg_at_end"] = list(os.getloadavg())
    atomic_write_json(args.json, results)
    print(format_table(results))
    if "shapes_bf16" in results:
        print(f"\nbf16 (cpu_native_bf16={results['cpu_native_bf16']}):")
        print(format_bf16_table(results))
    print()
    for claim, ok in results["targets"].items():
        print(f"{'MET   ' if ok else 'MISSED' if ok is not None else 'N/A   '} {claim}")
    print(f"\nGEMM peak {peak['peak_gflops']:.1f} GF/s; JSON written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
