"""Benchmark: quantised prefill, torch's weight-only kernels against dequantise + bf16 GEMM.

    python -m benchmarks.quant_prefill --threads 1 [--json OUT] [--quick]

torch's CPU kernels `_weight_int8pack_mm` and `_weight_int4pack_mm_for_cpu` take time
linear in the rows: each row is another pass over the weights, which suits decode (a few
rows) and not prefill (hundreds). `moelab.quant.experts.int8_rows_mm` / `int4_rows_mm`
switch to the weights dequantised to bf16 and one bf16 GEMM (float32 on CPUs without
native bf16: `dense_dtype`) from ``DENSE_MIN_ROWS`` rows of a matrix on. Side by side in one process, alternating, medians:

  1. one matrix at R rows, an expert's ([2F, D] = [2048, 768]) and the LM head's ([28096,
     768]): the kernel, and the dense path as it ships (dequantise + GEMM by blocks of
     `DENSE_BLOCK_ROWS` output rows), for int8 and int4 (group 128): where they cross;
  2. prefill of a P-token prompt through the ~200M Mixtral-shaped model of
     benchmarks/decode_formats.py, its experts (and with ``-all`` every linear) int8 or
     int4: the model's forward over the prompt with ``DENSE_MIN_ROWS`` as shipped, and
     with it set out of reach (the kernels at every row count), and the logits of both;
  3. (``--serve C,...``) the serving engine (`moelab.serve.Engine`, continuous batching)
     on ``C`` requests at once with ``max_num_seqs = C``, the same two ways: at 64 decoding
     rows the linears of a ``-all`` model reach the int8 threshold every step.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import machine_info, set_threads
from benchmarks.serve import add_build_args, quick_build_args
from moelab.io import atomic_write_json

log = logging.getLogger("benchmarks.quant_prefill")


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def matrix_rows(rows: list[int], repeats: int, shape: tuple[int, int]) -> list[dict]:
    """One matrix of `shape` at each row count: the kernels, and the dense path as it ships
    (`int8_rows_mm` / `int4_rows_mm` with the threshold at 1 row: by blocks of rows)."""
    from moelab.quant import experts as qe
    from moelab.quant import formats, vnni

    O, I = shape  # noqa: E741
    g = torch.Generator().manual_seed(0)
    w = torch.randn(O, I, generator=g) * 0.02
    q8, s8 = formats.quantize_int8(w)
    q4, s4, z4 = formats.quantize_int4(w, 128)
    packed, sz = qe.kernel_pack_int4(formats.pack_int4(q4)), qe.int4_scales_and_zeros(s4, z4)
    shipped = dict(qe.DENSE_MIN_ROWS)
    out = []
    try:
        qe.DENSE_MIN_ROWS.update(int8=1, int4=1, int4_vnni=1)
        for R in rows:
            x = torch.randn(R, I, generator=g).to(torch.bfloat16)
            cases = {
                "int8_kernel_ms": lambda x=x: torch._weight_int8pack_mm(x, q8, s8),
                "int8_dense_ms": lambda x=x: qe.int8_rows_mm(x, q8, s8),
                "int4_kernel_ms": lambda x=x: torch._weight_int4pack_mm_for_cpu(x, packed, 128, sz),
                "int4_dense_ms": lambda x=x: qe.int4_rows_mm(x, packed, 128, sz),
            }
            if qe.vnni_runs():  # moelab's own int4 x int8 kernel (`moelab.quant.vnni`)
                cases["int4_ours_ms"] = lambda x=x: vnni.w4a8_mm(x, packed, 128, sz)
            row = {"shape": list(shape), "rows": R, "dense_dtype": str(qe.dense_dtype()).removeprefix("torch."),
                   **{k: _median_ms(f, repeats) for k, f in cases.items()}}
            out.append(row)
            log.info("[%d, %d] R=%4d int8 kernel %7.2f ms, dense %7.2f | int4 kernel %7.2f ms, ours %s, dense %7.2f",
                     O, I, R, row["int8_kernel_ms"], row["int8_dense_ms"], row["int4_kernel_ms"],
                     f"{row['int4_ours_ms']:7.2f}" if "int4_ours_ms" in row else "-", row["int4_dense_ms"])
    finally:
        qe.DENSE_MIN_ROWS.update(shipped)
    return out


def quantized(ours, fmt: str):
    from moelab.quant import QuantFormat, quantize_model

    name, _, scope = fmt.partition("-")
    m = copy.deepcopy(ours)
    quantize_model(m, QuantFormat(name=name, group_size=128) if name == "int4" else name,
                   what="all" if scope == "all" else "experts")
    return m.eval()


def prefill(args, ours) -> list[dict]:
    from moelab.quant import experts as qe

    shipped = dict(qe.DENSE_MIN_ROWS)
    out = []
    for fmt in args.formats.split(","):
        m = quantized(ours, fmt)
        for P in (int(p) for p in args.prompts.split(",")):
            ids = torch.randint(2, ours.cfg.vocab_size, (1, P), generator=torch.Generator().manual_seed(P))

            def forward(ids=ids, m=m):
                with torch.inference_mode():
                    return m(ids, telemetry=False).logits

            times: dict[str, list[float]] = {"kernel": [], "dense": []}
            logits = {}
            for _ in range(args.repeats):  # alternate: a drift of the machine hits both alike
                for mode in ("kernel", "dense"):
                    qe.DENSE_MIN_ROWS.update({k: 10**9 for k in shipped} if mode == "kernel" else shipped)
                    t0 = time.perf_counter()
                    logits[mode] = forward()
                    times[mode].append(time.perf_counter() - t0)
            qe.DENSE_MIN_ROWS.update(shipped)
            k, d = (statistics.median(times[x][1:] or times[x]) * 1e3 for x in ("kernel", "dense"))
            diff = float((logits["kernel"] - logits["dense"]).abs().max() / logits["kernel"].abs().max())
            agree = float((logits["kernel"].argmax(-1) == logits["dense"].argmax(-1)).float().mean())
            out.append({"format": fmt, "prompt": P, "kernel_ms": k, "dense_ms": d, "speedup": k / d,
                        "logits_rel_diff": diff, "argmax_agreement": agree})
            log.info("%-9s prompt %4d: kernels %8.1f ms, with the dense path %8.1f ms (%.2fx); logits rel diff "
                     "%.2g, argmax agreement %.4f", fmt, P, k, d, k / d, diff, agree)
    return out


def serve(args, model_for) -> list[dict]:
    from benchmarks.serve import make_requests, run_engine
    from moelab.quant import experts as qe

    shipped = dict(qe.DENSE_MIN_ROWS)
    out = []
    for fmt in args.formats.split(","):
        m = model_for(fmt)
        for c in (int(x) for x in args.serve.split(",")):
            reqs = make_requests(c, args.serve_input, args.serve_output, m.cfg.vocab_size, seed=c)
            runs: dict[str, list[dict]] = {"kernel": [], "dense": []}
            for _ in range(args.serve_repeats):
                for mode in ("kernel", "dense"):
                    qe.DENSE_MIN_ROWS.update({k: 10**9 for k in shipped} if mode == "kernel" else shipped)
                    runs[mode].append(run_engine(m, reqs, c, max(512, c)))
            qe.DENSE_MIN_ROWS.update(shipped)
            k, d = (statistics.median(r["output_tok_s"] for r in runs[x]) for x in ("kernel", "dense"))
            same = runs["kernel"][0]["tokens"] == runs["dense"][0]["tokens"]
            out.append({"format": fmt, "concurrency": c, "kernel_tok_s": k, "dense_tok_s": d, "speedup": d / k,
                        "same_tokens": same})
            log.info("%-9s serve c=%3d: kernels %7.1f tok/s, with the dense path %7.1f (%.2fx); same tokens: %s",
                     fmt, c, k, d, d / k, same)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, default=Path("runs/bench/quant_prefill.json"))
    ap.add_argument("--threads", type=int)
    ap.add_argument("--rows", default="1,8,32,48,64,128,192,256,512")
    ap.add_argument("--prompts", default="128,512")
    ap.add_argument("--formats", default="int8,int4,int8-all,int4-all")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--serve", default=None, help="also the serving engine at these concurrencies (e.g. 16,64)")
    ap.add_argument("--serve-input", type=int, default=32)
    ap.add_argument("--serve-output", type=int, default=32)
    ap.add_argument("--serve-repeats", type=int, default=2)
    ap.add_argument("--skip-matrix", action="store_true")
    ap.add_argument("--skip-prefill", action="store_true")
    # benchmarks/serve.py's `build` model (the decode benchmarks' ~207M Mixtral)
    add_build_args(ap, max_len=1024)
    ap.add_argument("--quick", action="store_true", help="a small model, few rows (a smoke run)")
    args = ap.parse_args()
    if args.quick:
        quick_build_args(args)
        args.rows, args.prompts, args.repeats = "1,64,256", "64", 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    threads = set_threads(args.threads)
    shapes = [(2 * args.d_expert, args.d_model), (28096, args.d_model)]  # an expert's gate_up; the LM head (28093 rows, padded)
    from benchmarks.serve import build

    result = {"machine": {**machine_info(), "threads": threads}, "args": vars(args) | {"json": str(args.json)},
              "matrix_shapes": shapes}
    if not args.skip_matrix:
        rows = [int(r) for r in args.rows.split(",")]
        result["matrix"] = [r for shape in shapes for r in matrix_rows(rows, args.repeats, shape)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "hf"
        folder.mkdir()
        _, ours = build(folder, args)
        if not args.skip_prefill:
            result["prefill"] = prefill(args, ours)
        if args.serve:
            result["serve"] = serve(args, lambda fmt: quantized(ours, fmt))
    atomic_write_json(args.json, result)
    log.info("wrote %s", args.json)


if __name__ == "__main__":
    main()
