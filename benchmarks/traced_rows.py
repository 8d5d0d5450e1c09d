"""Benchmark: a compiled step's one-row matmuls, traced reduction against torch's kernels.

    python -m benchmarks.traced_rows --threads 1 [--json OUT]

Inside ``generate(compile=True)`` a one-row float linear can run as inductor's own
reduction (`moelab.moe.traced.one_row_linear`), and a one-row int8 one as
`moelab.quant.experts.int8_rows_traced`, where the dequantisation sits in the reduction's
loop. Whether that beats ``F.linear`` / ``torch._weight_int8pack_mm`` depends on whether
inductor vectorises the loads on this CPU: `moelab.quant.experts.traced_int8_pays` keeps the
int8 kernel on AVX2 builds of torch. Side by side in one process, each compiled once,
medians, for the ~207M model's LM head and an expert's gate_up matrix.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import machine_info, set_threads
from benchmarks.quant_prefill import _median_ms
from moelab.io import atomic_write_json

log = logging.getLogger("benchmarks.traced_rows")


def shape_row(O: int, I: int, repeats: int) -> dict:  # noqa: E741
    from moelab.moe import traced
    from moelab.quant import formats
    from moelab.quant.experts import int8_rows_traced

    g = torch.Generator().manual_seed(0)
    w = torch.randn(O, I, generator=g) * 0.02
    wb = w.to(torch.bfloat16)
    q8, s8 = formats.quantize_int8(w)
    s8b = s8.to(torch.bfloat16)
    x = torch.randn(1, I, generator=g)
    xb = x.to(torch.bfloat16)
    fp32 = torch.compile(lambda x: traced.one_row_linear(x, w), dynamic=False)
    bf16 = torch.compile(lambda x: traced.one_row_linear(x, wb), dynamic=False)
    int8 = torch.compile(lambda x: int8_rows_traced(x, q8.unsqueeze(0), s8b.unsqueeze(0)), dynamic=False)
    cases = {
        "fp32_linear_ms": lambda: F.linear(x, w), "fp32_traced_ms": lambda: fp32(x),
        "bf16_linear_ms": lambda: F.linear(xb, wb), "bf16_traced_ms": lambda: bf16(xb),
        "int8_kernel_ms": lambda: torch._weight_int8pack_mm(xb, q8, s8b), "int8_traced_ms": lambda: int8(xb),
    }
    with torch.no_grad():
        row = {"shape": [O, I], **{k: _median_ms(f, repeats) for k, f in cases.items()}}
    log.info("[%d, %d] %s", O, I, ", ".join(f"{k.removesuffix('_ms')} {v:.3f}" for k, v in row.items() if k != "shape"))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, default=Path("runs/bench/traced_rows.json"))
    ap.add_argument("--threads", type=int)
    ap.add_argument("--repeats", type=int, default=21)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    threads = set_threads(args.threads)
    from moelab.quant.experts import traced_int8_pays

    rows = [shape_row(O, I, args.repeats) for O, I in ((28096, 768), (2048, 768))]  # noqa: E741
    atomic_write_json(args.json, {"machine": {**machine_info(), "threads": threads},
                                  "traced_int8_pays": traced_int8_pays(), "rows": rows})
    log.info("wrote %s", args.json)


if __name__ == "__main__":
    main()
