"""Benchmark: decode tokens/s per weight format, moelab against transformers and llama.cpp.

    python -m benchmarks.decode_formats --threads 2 [--compile] [--json runs/bench/decode_formats.json]

Issue #12's decode targets: int8 >= 2.5x HF fp32 and >= 1.3x HF bf16, and within 1.2x of
llama.cpp q8_0 (or ahead). One process, one set of weights: a random Mixtral-shaped model
of ~200M parameters (benchmarks/serve.py's `build`: transformers' `MixtralForCausalLM`
with a trained BPE tokenizer, saved, imported into moelab), so every contender runs the
same numbers in its own format:

  hf_fp32, hf_bf16           transformers `generate`, greedy, its default cache
  ours_fp32, ours_bf16       moelab `generate` (the model cast to bf16 for the second)
  ours_int8, ours_int4       experts quantised (`moelab.quant`, int4 groups of 128), the rest
                             float32 (what `moelab quantize --what experts` keeps)
  ours_int8_rest_bf16 ...    the same with the rest cast to bf16 (`generate --dtype bf16`)
  ours_int8_all ...          `--what all`: attention, dense FFNs and the LM head int8 too
  ours_int4_all_head8        int4 `--what all` with the LM head in int8 (`--head-format int8`)
  *_compiled                 `generate(compile=True)` (with --compile)
  llama_cpp_f16, _q8_0, _q4_0 llama-cpp-python on our GGUF export (batch 1 only: its
                             high-level API decodes one sequence; the batched server is
                             benchmarks/serve.py's), same thread count

Each contender is timed end to end with 1 and with N new tokens, alternating contenders
in every repeat; decode tok/s = B (N - 1) / (median t_N - median t_1), which removes
prefill the same way for all. Bytes per step are each format's weights touched by a
decode step (every non-expert weight, the distinct experts the batch chose, counted
from the fp32 model's recorded routing), so "GB/s" is the achieved weight bandwidth.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.common import machine_info, set_threads
from benchmarks.serve import add_build_args, quick_build_args
from moelab.infer.generate import generate
from moelab.io import atomic_write_json

log = logging.getLogger("benchmarks.decode_formats")

Timer = Callable[[int], tuple[float, list[list[int]]]]  # new tokens -> (seconds, token ids per row)


def _weight_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(non-expert bytes a decode step reads, bytes of one expert) of a moelab model."""
    from moelab.moe import MoE

    expert_ids = set()
    expert_bytes = 0
    for m in model.modules():
        if isinstance(m, MoE):
            ex = m.experts
            expert_ids |= {id(t) for t in (*ex.parameters(), *ex.buffers())}
            if hasattr(ex, "resident_nbytes"):
                expert_bytes = ex.resident_nbytes() // ex.num_experts
            else:
                expert_bytes = sum(t.numel() * t.element_size() for t in ex.parameters()) // ex.num_experts
    other = 0
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        if id(t) in expert_ids or name == "embed_tokens.weight":
            continue
        other += t.numel() * t.element_size()
    for m in model.modules():  # int8/int4 linears' kernel copies that are not buffers
        if hasattr(m, "kernel_only_nbytes"):
            other += m.kernel_only_nbytes()
    return other, expert_bytes


def distinct_experts_per_step(model, prompts: list[list[int]], new: int) -> float:
    """Mean over decode steps of the distinct experts the batch uses, summed over MoE layers."""
    rec = generate(model, prompts, max_new_tokens=new, record_routing=True).routing
    layers = range(len(rec[0][0].experts))
    steps = [sum(len({e for row in rec for e in row[t].experts[i]}) for i in layers) for t in range(1, new)]
    return statistics.mean(steps)


def ours_timer(model, prompts, compile: bool = False) -> Timer:
    def run(n: int):
        t0 = time.perf_counter()
        res = generate(model, prompts, max_new_tokens=n, compile=compile)
        return time.perf_counter() - t0, res.token_ids
    return run


def hf_timer(hf, prompts) -> Timer:
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)

    def run(n: int):
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=1)
        return time.perf_counter() - t0, out[:, ids.shape[1]:].tolist()
    return run


def llama_cpp_timer(llm, prompt: list[int]) -> Timer:
    def run(n: int):
        t0 = time.perf_counter()
        out: list[int] = []
        for t in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            out.append(int(t))
            if len(out) == n:
                break
        return time.perf_counter() - t0, [out]
    return run


def time_contenders(contenders: dict[str, Timer], B: int, new: int, repeats: int) -> dict[str, dict]:
    for fn in contenders.values():  # warm-up (and compile, for the compiled ones)
        fn(2)
    t1: dict[str, list[float]] = {k: [] for k in contenders}
    tn: dict[str, list[float]] = {k: [] for k in contenders}
    tokens: dict[str, list[list[int]]] = {}
    for _ in range(repeats):
        for name, fn in contenders.items():
            t1[name].append(fn(1)[0])
            dt, toks = fn(new)
            tn[name].append(dt)
            tokens[name] = toks
    out = {}
    for name in contenders:
        step = (statistics.median(tn[name]) - statistics.median(t1[name])) / (new - 1)
        out[name] = {"ms_per_step": 1e3 * step, "decode_tok_s": B / max(step, 1e-9), "tokens": tokens[name]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, default=Path("runs/bench/decode_formats.json"))
    # The defaults are benchmarks/serve.py's ~207M model (and BENCHMARKS.md "Decode"'s shape).
    add_build_args(ap, max_len=512)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--compile", action="store_true", help="also the compiled decode step of each moelab format")
    ap.add_argument("--only", default=None, help="comma-separated contender names (default: all)")
    ap.add_argument("--quick", action="store_true", help="a small model and few tokens (a smoke run)")
    args = ap.parse_args()
    if args.quick:
        quick_build_args(args)
        args.new_tokens, args.repeats = 8, 1
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    threads = set_threads(args.threads)

    from benchmarks.serve import build
    from moelab.quant import QuantFormat, quantize_model

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "hf"
        folder.mkdir()
        hf, ours = build(folder, args)
        n_params = sum(p.numel() for p in hf.parameters())
        log.info("model: %.1fM parameters, %d threads", n_params / 1e6, threads)
        hf_bf16 = copy.deepcopy(hf).to(torch.bfloat16)
        models = {"ours_fp32": ours, "ours_bf16": copy.deepcopy(ours).to(torch.bfloat16)}
        for fmt in ("int8", "int4"):
            q = copy.deepcopy(ours)
            quantize_model(q, QuantFormat(name=fmt, group_size=128) if fmt == "int4" else fmt)
            models[f"ours_{fmt}"] = q
            models[f"ours_{fmt}_rest_bf16"] = copy.deepcopy(q).to(torch.bfloat16)
            a = copy.deepcopy(ours)
            quantize_model(a, QuantFormat(name=fmt, group_size=128) if fmt == "int4" else fmt, what="all")
            models[f"ours_{fmt}_all"] = a
        # int4 `--what all` with the LM head in int8 (`moelab quantize --head-format int8`)
        h = copy.deepcopy(ours)
        quantize_model(h, QuantFormat(name="int4", group_size=128), what="all", head="int8")
        models["ours_int4_all_head8"] = h
        llms = {}
        try:
            import llama_cpp

            from moelab.hf.gguf import export_gguf

            for t in ("f16", "q8_0", "q4_0"):
                res = export_gguf(ours, Path(tmp) / f"m-{t}.gguf", tokenizer_path=folder / "tokenizer.json",
                                  file_type=t)
                llms[f"llama_cpp_{t}"] = (llama_cpp.Llama(model_path=str(res.path), n_ctx=args.max_len,
                                                          n_batch=args.max_len, n_threads=threads, verbose=False),
                                          res.n_bytes)
        except ImportError as e:
            log.info("llama.cpp rows skipped: %s (make install-bench)", e)
        only = set(args.only.split(",")) if args.only else None

        cases = []
        for B in (int(b) for b in args.batches.split(",")):
            g = torch.Generator().manual_seed(B)
            prompts = torch.randint(2, ours.cfg.vocab_size, (B, args.prompt_len), generator=g).tolist()
            distinct = distinct_experts_per_step(ours, prompts, args.new_tokens)
            contenders: dict[str, Timer] = {"hf_fp32": hf_timer(hf, prompts), "hf_bf16": hf_timer(hf_bf16, prompts)}
            for name, m in models.items():
                contenders[name] = ours_timer(m, prompts)
                if args.compile:
                    contenders[f"{name}_compiled"] = ours_timer(m, prompts, compile=True)
            if B == 1:
                for name, (llm, _) in llms.items():
                    contenders[name] = llama_cpp_timer(llm, prompts[0])
            if only:
                contenders = {k: v for k, v in contenders.items() if k in only or k == "hf_fp32"}
            res = time_contenders(contenders, B, args.new_tokens, args.repeats)
            ref = res["ours_fp32"]["tokens"] if "ours_fp32" in res else None
            for name, r in res.items():
                base = name.removesuffix("_compiled")
                if base in models:
                    other, per_expert = _weight_bytes(models[base])
                    r["bytes_per_step"] = other + distinct * per_expert
                    r["GBps"] = r["bytes_per_step"] / (r["ms_per_step"] / 1e3) / 1e9
                r["vs_hf_fp32"] = r["decode_tok_s"] / res["hf_fp32"]["decode_tok_s"]
                if "hf_bf16" in res:
                    r["vs_hf_bf16"] = r["decode_tok_s"] / res["hf_bf16"]["decode_tok_s"]
                if "llama_cpp_q8_0" in res:
                    r["vs_llama_cpp_q8_0"] = r["decode_tok_s"] / res["llama_cpp_q8_0"]["decode_tok_s"]
                if ref is not None:
                    r["greedy_agreement_with_ours_fp32"] = statistics.mean(
                        float(a == b) for ra, rb in zip(r["tokens"], ref, strict=True) for a, b in zip(ra, rb, strict=False))
                del r["tokens"]
                log.info("batch %d %-28s %7.1f tok/s %7.1f ms/step  %.2fx HF fp32  %s", B, name, r["decode_tok_s"],
                         r["ms_per_step"], r["vs_hf_fp32"],
                         f"{r['GBps']:.1f} GB/s" if "GBps" in r else "")
            cases.append({"batch": B, "distinct_experts_per_step": distinct, "results": res})
        atomic_write_json(args.json, {
            "machine": {**machine_info(), "threads": threads},
            "model": {"params": n_params, "d_model": args.d_model, "d_expert": args.d_expert, "layers": args.layers,
                      "vocab": ours.cfg.vocab_size},
            "llama_cpp_file_bytes": {k: v[1] for k, v in llms.items()},
            "cases": cases,
        })
        log.info("wrote %s", args.json)


if __name__ == "__main__":
    main()
