"""Benchmark: moelab's int4 x int8 kernel against torch's int4 CPU kernel (W4A8 vs W4A16).

    python -m benchmarks.int4_vnni --threads 1 [--run RUN_DIR] [--json OUT] [--quick]

`moelab.quant.vnni` multiplies int4 weights (torch's own blocked packing) by activations
rounded to int8 per block of 32, with AVX512-VNNI (or, on CPUs without AVX512, AVX2's
vpmaddubsw; the JSON's ``kernel`` says which), where torch's kernel converts each nibble to
float and multiplies it by a bf16 activation. `moelab.quant.experts.int4_rows_mm`
uses it where ``O * I * (R + 1) >= VNNI_MIN_WORK``, below the dense path's threshold
(``DENSE_MIN_ROWS["int4_vnni"]`` on CPUs without AMX). Side by side in one process,
alternating, medians:

  1. one matrix at R rows: torch's kernel, the VNNI kernel, and (from 32 rows) the dense
     path (bf16 dequantisation + GEMM), over 32 distinct matrices of each shape that is
     small enough (so that, as in a decode step, the weights come from memory, not cache);
     shapes: an expert's gate_up and down_proj and the LM head of the ~207M model, and
     small ones for the size threshold;
  2. decode tok/s of the ~207M Mixtral-shaped model of benchmarks/decode_formats.py, int4
     experts and int4 ``--what all``, eager and compiled, batch 1 and 8, with the kernel
     (each layer's experts in one call), with it per matrix (`vnni.unfused()`) and inside
     `vnni.disabled()`; llama.cpp's q4_0 and q8_0 on our GGUF export beside
     them at batch 1 when llama-cpp-python is installed (``make install-bench``);
  3. (``--run``) quality on a trained run: val loss against fp32 (with the SE of the paired
     per-token difference), KL(fp32 || model) and teacher-forced top-1 agreement with
     fp32's greedy text, for int4 experts / all / all with an int8 head, with the kernel
     on every int4 matrix at every row count (its numbers do not depend on the rows: each
     row is rounded on its own; decode leaves the smallest matrices on torch's kernel, so
     this bounds what it changes) and with torch's kernel on every one.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import statistics
import tempfile
from pathlib import Path

import torch

from benchmarks.common import machine_info, set_threads
from benchmarks.quant_prefill import _median_ms
from benchmarks.serve import add_build_args, quick_build_args
from moelab.io import atomic_write_json

log = logging.getLogger("benchmarks.int4_vnni")


def matrix_rows(shape: tuple[int, int], rows: list[int], repeats: int, group_size: int = 128) -> list[dict]:
    """Per row count, ms for one matrix of `shape`: torch's kernel, ours, the dense path."""
    from moelab.quant import experts as qe
    from moelab.quant import formats, vnni

    O, I = shape  # noqa: E741
    n_mats = 32 if O * I < 4_000_000 else 1
    g = torch.Generator().manual_seed(0)
    mats = []
    for _ in range(n_mats):
        q, s, z = formats.quantize_int4(torch.randn(O, I, generator=g) * 0.02, group_size)
        mats.append((qe.kernel_pack_int4(formats.pack_int4(q)), qe.int4_scales_and_zeros(s, z)))
    out = []
    shipped = dict(qe.DENSE_MIN_ROWS)
    try:
        qe.DENSE_MIN_ROWS.update(int4=1, int4_vnni=1)  # "dense_ms": the dense path at every row count
        for R in rows:
            x = torch.randn(R, I, generator=g).to(torch.bfloat16)
            cases = {
                "torch_ms": lambda x=x: [torch._weight_int4pack_mm_for_cpu(x, p, group_size, sz) for p, sz in mats],
                "vnni_ms": lambda x=x: [vnni.w4a8_mm(x, p, group_size, sz) for p, sz in mats],
            }
            if R >= 32:
                cases["dense_ms"] = lambda x=x: [qe.int4_rows_mm(x, p, group_size, sz) for p, sz in mats]
            row = {"shape": [O, I], "rows": R, **{k: _median_ms(f, repeats) / n_mats for k, f in cases.items()}}
            row["speedup"] = row["torch_ms"] / row["vnni_ms"]
            row["vnni_gweights_s"] = O * I * R / (row["vnni_ms"] / 1e3) / 1e9
            out.append(row)
            log.info("[%5d, %4d] R=%3d torch %8.4f ms  vnni %8.4f ms (%.2fx, %5.1fG weights/s)%s", O, I, R,
                     row["torch_ms"], row["vnni_ms"], row["speedup"], row["vnni_gweights_s"],
                     f"  dense {row['dense_ms']:.4f}" if "dense_ms" in row else "")
    finally:
        qe.DENSE_MIN_ROWS.update(shipped)
    return out


def _off(timer):
    from moelab.quant import vnni

    def run(n: int):
        with vnni.disabled():
            return timer(n)
    return run


def _unfused(timer):
    from moelab.quant import vnni

    def run(n: int):
        with vnni.unfused():
            return timer(n)
    return run


def decode(args) -> list[dict]:
    """Decode tok/s of the ~207M model, int4 experts and int4 all, kernel on and off."""
    from benchmarks.decode_formats import llama_cpp_timer, ours_timer, time_contenders
    from benchmarks.serve import build
    from moelab.quant import QuantFormat, quantize_model

    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "hf"
        folder.mkdir()
        _, ours = build(folder, args)
        models = {}
        for what in ("experts", "all"):
            m = copy.deepcopy(ours)
            quantize_model(m, QuantFormat(name="int4", group_size=128), what=what)
            models[f"int4_{what}"] = m
        m = copy.deepcopy(ours)
        quantize_model(m, "int8", what="all")
        models["int8_all"] = m
        llms = {}
        try:
            import llama_cpp

            from moelab.hf.gguf import export_gguf

            for t in ("q8_0", "q4_0"):
                res = export_gguf(ours, Path(tmp) / f"m-{t}.gguf", tokenizer_path=folder / "tokenizer.json", file_type=t)
                llms[f"llama_cpp_{t}"] = llama_cpp.Llama(model_path=str(res.path), n_ctx=args.max_len,
                                                         n_batch=args.max_len, n_threads=torch.get_num_threads(),
                                                         verbose=False)
        except ImportError as e:
            log.info("llama.cpp rows skipped: %s (make install-bench)", e)
        for B in (int(b) for b in args.batches.split(",")):
            prompts = torch.randint(2, ours.cfg.vocab_size, (B, args.prompt_len),
                                    generator=torch.Generator().manual_seed(B)).tolist()
            contenders = {}
            for name, m in models.items():
                for compiled in (False, True):
                    t = ours_timer(m, prompts, compile=compiled)
                    key = f"{name}{'_compiled' if compiled else ''}"
                    if name.startswith("int4"):
                        contenders[f"{key}_vnni"] = t
                        contenders[f"{key}_permatrix"] = _unfused(t)
                        contenders[f"{key}_torch"] = _off(t)
                    else:
                        contenders[key] = t
            if B == 1:
                contenders.update({k: llama_cpp_timer(llm, prompts[0]) for k, llm in llms.items()})
            res = time_contenders(contenders, B, args.new_tokens, args.repeats)
            for name, r in res.items():
                log.info("batch %d %-32s %7.1f tok/s", B, name, r["decode_tok_s"])
            pairs = {}
            for key in contenders:
                if key.endswith("_vnni"):
                    base = key.removesuffix("_vnni")
                    on, off = res[key], res[f"{base}_torch"]
                    same = [float(a == b) for ra, rb in zip(on["tokens"], off["tokens"], strict=True)
                            for a, b in zip(ra, rb, strict=False)]
                    per = res[f"{base}_permatrix"]
                    pairs[base] = {"speedup": on["decode_tok_s"] / off["decode_tok_s"],
                                   "speedup_per_matrix": per["decode_tok_s"] / off["decode_tok_s"],
                                   "one_call_layer": on["decode_tok_s"] / per["decode_tok_s"],
                                   "greedy_agreement": statistics.mean(same)}
                    log.info("batch %d %-24s vnni / torch %.2fx, per matrix / torch %.2fx, one-call layer / per "
                             "matrix %.2fx (greedy tokens alike %.2f)", B, base, pairs[base]["speedup"],
                             pairs[base]["speedup_per_matrix"], pairs[base]["one_call_layer"],
                             pairs[base]["greedy_agreement"])
            for r in res.values():
                del r["tokens"]
            cases.append({"batch": B, "results": res, "vnni_vs_torch": pairs})
    return cases


def quality(args) -> list[dict]:
    """int4 with the kernel against torch's kernel, both at every row count, on a trained run."""
    from benchmarks.int4_methods import WHAT, agreement, eval_setup, token_stats, versus_fp32
    from moelab.quant import QuantFormat, quantize_model, vnni
    from moelab.quant import experts as qe

    model, val, seqs, base, ref_logp = eval_setup(args.run, args.tokens, args.gen)
    log.info("run %s: fp32 val %.5f over %d tokens", args.run, float(base.mean()), base.numel())
    rows = []
    shipped = (dict(qe.DENSE_MIN_ROWS), qe.VNNI_MIN_WORK)
    try:  # the kernels of decode at every row count, on every int4 matrix
        qe.DENSE_MIN_ROWS.update(int4=10**9, int4_vnni=10**9)
        qe.VNNI_MIN_WORK = 0
        for what, (scope, head) in WHAT.items():
            m = copy.deepcopy(model)
            quantize_model(m, QuantFormat(name="int4", group_size=128), what=scope, head=head)
            m.eval()
            for kernel in ("torch", "vnni"):
                ctx = vnni.disabled() if kernel == "torch" else contextlib.nullcontext()
                with ctx, torch.inference_mode():
                    row = {"what": what, "kernel": kernel, **versus_fp32(token_stats(m, val, ref_logp)[0], base),
                           "agreement": agreement(m, seqs)}
                rows.append(row)
                log.info("int4 %-9s %-5s: val %+.5f +- %.5f, KL %.5f +- %.5f, agreement %.4f", what, kernel,
                         row["delta"], row["se"], row["kl"], row["kl_se"], row["agreement"])
    finally:
        qe.DENSE_MIN_ROWS.update(shipped[0])
        qe.VNNI_MIN_WORK = shipped[1]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, default=Path("runs/bench/int4_vnni.json"))
    ap.add_argument("--threads", type=int)
    ap.add_argument("--rows", default="1,2,4,8,16,32,64,128")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--run", help="a trained moelab run dir (float): also the quality rows")
    ap.add_argument("--tokens", type=int, default=8192, help="validation tokens per domain (--run)")
    ap.add_argument("--gen", type=int, default=256, help="fp32 greedy tokens per prompt (--run)")
    ap.add_argument("--skip-matrix", action="store_true")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--decode-repeats", type=int, default=5)
    # benchmarks/serve.py's `build` model (the decode benchmarks' ~207M Mixtral)
    add_build_args(ap, max_len=512)
    ap.add_argument("--quick", action="store_true", help="a small model, few rows (a smoke run)")
    args = ap.parse_args()
    if args.quick:
        quick_build_args(args)
        args.rows, args.repeats, args.new_tokens, args.decode_repeats = "1,8,64", 2, 8, 1
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    threads = set_threads(args.threads)
    from moelab.quant import experts as qe
    from moelab.quant import vnni

    if not qe.vnni_runs():
        why = vnni.unavailable_reason() or "its probe failed (see the log)"
        log.info("the int4 x int8 kernel cannot run here: %s", why)
        atomic_write_json(args.json, {"machine": {**machine_info(), "threads": threads}, "skipped": why})
        return
    result = {"machine": {**machine_info(), "threads": threads}, "args": vars(args) | {"json": str(args.json)},
              "kernel": vnni.variant().name,
              "thresholds": {"VNNI_MIN_WORK": qe.VNNI_MIN_WORK, "DENSE_MIN_ROWS": dict(qe.DENSE_MIN_ROWS)}}
    if not args.skip_matrix:
        rows = [int(r) for r in args.rows.split(",")]
        D, F = args.d_model, args.d_expert
        shapes = [(2 * F, D), (D, F), (28096 if not args.quick else 2048, D), (256, 128), (512, 256), (1024, 256)]
        result["matrix"] = [r for s in shapes for r in matrix_rows(s, rows, args.repeats)]
    if not args.skip_decode:
        result["decode"] = decode(args)
    if args.run:
        result["quality"] = quality(args)
    atomic_write_json(args.json, result)
    log.info("wrote %s", args.json)


if __name__ == "__main__":
    main()
