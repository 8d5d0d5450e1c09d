"""Benchmark: decode tokens/s, moelab `generate` vs transformers `generate`, same weights.

    python -m benchmarks.decode --json runs/bench/decode.json [--quick] [--compile]

A Mixtral-style model of ~200M parameters (random weights) is built with transformers,
saved, and imported into moelab (`moelab.hf.from_pretrained`), so both run the very same
weights in one process, CPU fp32, greedy, no stop token. For batch 1 and 8 (prompts of
``--prompt-len`` tokens) each implementation is timed end to end twice, with 1 and with
N new tokens, alternating ours/HF every repeat; decode tokens/s = B * (N - 1) /
(t_N - t_1), which removes prefill from both in the same way. HF uses its default
(dynamic) cache. ``--compile`` adds ours with ``generate(compile=True)`` (a compiled
static-shape decode step) as a third contender in the same alternation; its compile
time is the first call's wall time with inductor's on-disk caches disabled (cold).

Bandwidth: the physical limit of decode is reading the weights each step. Bytes touched
per step = attention + norms + routers + lm_head + the *distinct* experts the batch
chose in each MoE layer (counted from the recorded routing of the real run) + the KV
cache read; achieved bandwidth = bytes per step * steps/s, compared with this machine's
measured read bandwidth (sum over a 1 GiB tensor) and copy bandwidth.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch._inductor.config

from benchmarks.common import machine_info, set_threads, time_ms
from moelab.hf import from_pretrained
from moelab.infer.generate import generate
from moelab.io import atomic_write_json

log = logging.getLogger("benchmarks.decode")


def memory_bandwidth(gib: float = 1.0) -> dict:
    """Read (sum) and copy bandwidth over a tensor much larger than the caches, GB/s."""
    n = int(gib * 2**30) // 4
    a, b = torch.ones(n), torch.empty(n)
    read = time_ms(lambda: a.sum(), warmup=1, min_repeats=5, budget_s=3.0)
    copy = time_ms(lambda: b.copy_(a), warmup=1, min_repeats=5, budget_s=3.0)
    return {
        "read_GBps": 4 * n / read["median_ms"] / 1e6,
        "copy_GBps": 2 * 4 * n / copy["median_ms"] / 1e6,  # read + write
        "bytes": 4 * n,
    }


def build(args) -> tuple[object, object, dict]:
    from transformers import AutoModelForCausalLM, MixtralConfig

    cfg = MixtralConfig(
        vocab_size=args.vocab,
        hidden_size=args.d_model,
        intermediate_size=args.d_expert,
        num_hidden_layers=args.layers,
        num_attention_heads=args.d_model // 64,
        num_key_value_heads=4,
        num_local_experts=args.experts,
        num_experts_per_tok=args.top_k,
        max_position_embeddings=4096,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = from_pretrained(d)
    n_params = sum(p.numel() for p in hf.parameters())
    return hf, ours, {"hf_config": cfg.to_dict(), "params": n_params}


def weight_bytes_per_step(model, routing_rows) -> dict:
    """Bytes of weights read by one decode step, from the recorded routing of each row."""
    cfg = model.cfg
    elt = model.embed_tokens.weight.element_size()
    moe_layers = set(cfg.moe_layers)
    always = 0
    for name, p in model.named_parameters():
        if ".experts." in name:
            continue
        if name == "embed_tokens.weight":
            continue  # only B rows are read
        always += p.numel() * elt
    expert_bytes = 3 * cfg.d_model * cfg.moe.d_expert * elt
    steps = len(routing_rows[0])
    distinct = []
    for t in range(1, steps):  # step 0 is the prefill
        per_layer = [
            len({e for row in routing_rows for e in row[t].experts[i]}) for i in moe_layers
        ]
        distinct.append(sum(per_layer))
    mean_distinct = statistics.mean(distinct)
    B = len(routing_rows)
    return {
        "dense_bytes": always + B * cfg.d_model * elt,
        "expert_bytes": mean_distinct * expert_bytes,
        "mean_distinct_experts_per_layer": mean_distinct / len(moe_layers),
        "total_bytes": always + B * cfg.d_model * elt + mean_distinct * expert_bytes,
    }


def kv_bytes_per_step(model, B: int, mean_len: float) -> float:
    cfg = model.cfg
    return (
        2
        * cfg.n_layers
        * B
        * cfg.kv_heads
        * cfg.dim_head
        * mean_len
        * model.embed_tokens.weight.element_size()
    )


def run_case(hf, ours, B: int, prompt_len: int, new: int, repeats: int, compile: bool = False) -> dict:
    g = torch.Generator().manual_seed(B)
    prompts = torch.randint(0, ours.cfg.vocab_size, (B, prompt_len), generator=g)
    mask = torch.ones_like(prompts)
    plist = prompts.tolist()

    def t_ours(n):
        t0 = time.perf_counter()
        res = generate(ours, plist, max_new_tokens=n)
        return time.perf_counter() - t0, res

    def t_ours_compiled(n):
        t0 = time.perf_counter()
        res = generate(ours, plist, max_new_tokens=n, compile=True)
        return time.perf_counter() - t0, res

    def t_hf(n):
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(
                prompts,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )
        return time.perf_counter() - t0, out[:, prompt_len:].tolist()

    contenders = [("ours", t_ours), ("hf", t_hf)]
    compile_s = None
    if compile:
        contenders.insert(1, ("ours_compiled", t_ours_compiled))
        with torch._inductor.config.patch(force_disable_caches=True):
            compile_s = t_ours_compiled(2)[0]  # compiles the (B, cache length) graph, cold
        log.info("batch %d: first compiled call (compile + 1 step) %.1f s", B, compile_s)
    for _, fn in contenders:  # warm-up
        fn(2)
    rows: dict[str, list[float]] = {f"{name}_{n}": [] for name, _ in contenders for n in ("1", "N")}
    same = same_compiled = True
    for _ in range(repeats):
        for name, fn in contenders:
            rows[f"{name}_1"].append(fn(1)[0])
            dt, out = fn(new)
            rows[f"{name}_N"].append(dt)
            if name == "ours":
                ours_ids = out.token_ids
            elif name == "ours_compiled":
                same_compiled = same_compiled and out.token_ids == ours_ids
            else:
                same = same and out == ours_ids
    med = {k: statistics.median(v) for k, v in rows.items()}
    res = {
        "batch": B,
        "prompt_len": prompt_len,
        "new_tokens": new,
        "repeats": repeats,
        "median_s": med,
        "same_tokens_as_hf": same,
    }
    for name, _ in contenders:
        res[f"{name}_decode_tok_s"] = B * (new - 1) / max(med[f"{name}_N"] - med[f"{name}_1"], 1e-9)
        res[f"{name}_ms_per_step"] = 1e3 * (med[f"{name}_N"] - med[f"{name}_1"]) / (new - 1)
    res["speedup"] = res["ours_decode_tok_s"] / res["hf_decode_tok_s"]
    if compile:
        res["compile_first_call_s"] = compile_s
        res["compiled_same_tokens_as_eager"] = same_compiled
        res["speedup_compiled"] = res["ours_compiled_decode_tok_s"] / res["hf_decode_tok_s"]
        res["compiled_vs_eager"] = res["ours_compiled_decode_tok_s"] / res["ours_decode_tok_s"]
    recorded = generate(ours, plist, max_new_tokens=new, record_routing=True)
    wb = weight_bytes_per_step(ours, recorded.routing)
    wb["kv_bytes"] = kv_bytes_per_step(ours, B, prompt_len + new / 2)
    steps_per_s = 1e3 / res["ours_ms_per_step"]
    res["bytes_per_step"] = wb
    res["ours_achieved_GBps"] = (wb["total_bytes"] + wb["kv_bytes"]) * steps_per_s / 1e9
    res["hf_achieved_GBps"] = (
        (wb["total_bytes"] + wb["kv_bytes"]) * 1e3 / res["hf_ms_per_step"] / 1e9
    )
    if compile:
        res["ours_compiled_achieved_GBps"] = (
            (wb["total_bytes"] + wb["kv_bytes"]) * 1e3 / res["ours_compiled_ms_per_step"] / 1e9
        )
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, default=Path("runs/bench/decode.json"))
    ap.add_argument(
        "--quick", action="store_true", help="a small model and few tokens (smoke test)"
    )
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--d-expert", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--threads", type=int, help="intra-op threads (default: all cores)")
    ap.add_argument(
        "--compile", action="store_true", help="also time generate(compile=True) (compiled decode step)"
    )
    args = ap.parse_args()
    if args.quick:
        args.vocab, args.d_model, args.d_expert, args.layers, args.new_tokens, args.repeats = (
            4096,
            256,
            512,
            2,
            8,
            1,
        )
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    threads = set_threads(args.threads)
    bw = memory_bandwidth(0.25 if args.quick else 1.0)
    log.info("memory bandwidth: read %.1f GB/s, copy %.1f GB/s", bw["read_GBps"], bw["copy_GBps"])
    hf, ours, info = build(args)
    log.info("model: %.1fM parameters", info["params"] / 1e6)
    cases = []
    for B in (int(b) for b in args.batches.split(",")):
        r = run_case(hf, ours, B, args.prompt_len, args.new_tokens, args.repeats, args.compile)
        log.info(
            "batch %d: ours %.1f tok/s (%.1f ms/step), hf %.1f tok/s (%.1f ms/step), speedup %.2fx, "
            "achieved %.1f GB/s, same tokens: %s",
            B,
            r["ours_decode_tok_s"],
            r["ours_ms_per_step"],
            r["hf_decode_tok_s"],
            r["hf_ms_per_step"],
            r["speedup"],
            r["ours_achieved_GBps"],
            r["same_tokens_as_hf"],
        )
        if args.compile:
            log.info(
                "batch %d: ours compiled %.1f tok/s (%.1f ms/step), %.2fx HF, %.2fx ours eager, "
                "same tokens as eager: %s",
                B,
                r["ours_compiled_decode_tok_s"],
                r["ours_compiled_ms_per_step"],
                r["speedup_compiled"],
                r["compiled_vs_eager"],
                r["compiled_same_tokens_as_eager"],
            )
        cases.append(r)
    bw_after = memory_bandwidth(0.25 if args.quick else 1.0)
    atomic_write_json(
        args.json,
        {
            "machine": {**machine_info(), "threads": threads},
            "bandwidth": {"before": bw, "after": bw_after},
            "model": {
                "params": info["params"],
                "layers": args.layers,
                "d_model": args.d_model,
                "d_expert": args.d_expert,
                "experts": args.experts,
                "top_k": args.top_k,
                "vocab": args.vocab,
            },
            "cases": cases,
        },
    )
    log.info("wrote %s", args.json)


if __name__ == "__main__":
    main()
