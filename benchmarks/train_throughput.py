"""Benchmark: training throughput of our model vs transformers' `MixtralForCausalLM`, CPU fp32.

    python -m benchmarks.train_throughput [--model tiny-moe] [--batch-size 8] [--seq-len 128]
                                          [--steps 12] [--threads 2] [--json] [--out PATH]

Same tiny config (copied dimension by dimension: vocab, width, layers, heads, KV heads,
experts, top-k, expert width, RoPE theta, norm eps, untied head), same batch, random
weights, fp32 on CPU. One training step = forward + backward + AdamW step (same AdamW
settings, foreach), with the LM loss plus the load-balancing loss (coefficient 0.01) on
both sides; our z-loss (0.001) is left on, as in training, which only costs us time.
Steps of the models are interleaved (ours, ours with full logits, HF eager, HF other
experts implementations, ours, ...) so machine-load drift hits all alike; the median of the timed steps is
reported after warm-up steps. HF experts implementations that fail to run are reported
as such, not hidden.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from collections.abc import Callable

import torch

from benchmarks.common import machine_info, set_threads
from moelab.io import atomic_write_json
from moelab.model import Transformer, get_preset
from moelab.model.config import ModelConfig

log = logging.getLogger("benchmarks.train_throughput")

HF_IMPLS = ("eager", "batched_mm", "grouped_mm")


def build_hf(cfg: ModelConfig, impl: str) -> torch.nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    moe = cfg.moe
    assert moe is not None
    config = MixtralConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=moe.d_expert,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.dim_head,
        max_position_embeddings=cfg.max_seq_len,
        rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.norm_eps,
        num_local_experts=moe.num_experts,
        num_experts_per_tok=moe.top_k,
        router_aux_loss_coef=moe.aux_loss_coef,
        output_router_logits=True,  # the aux loss is part of the training objective
        router_jitter_noise=0.0,
        tie_word_embeddings=cfg.tie_embeddings,
        attn_implementation="sdpa",
        use_cache=False,
    )
    config._experts_implementation = impl
    model = MixtralForCausalLM(config)
    model.train()
    return model


def _step_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, return_logits: bool) -> Callable[[], float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)

    def step() -> float:
        loss = model(x, targets=y, return_logits=return_logits).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def run(model_name: str, batch_size: int, seq_len: int, steps: int, warmup: int, threads: int) -> dict:
    threads = set_threads(threads)
    cfg = get_preset(model_name)
    if cfg.moe is None:
        raise SystemExit(f"{model_name} is dense; this benchmark compares MoE models with Mixtral")
    torch.manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (batch_size, seq_len + 1))
    inputs, targets = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    runners: dict[str, Callable[[], float]] = {}
    params: dict[str, int] = {}
    ours = Transformer(cfg).train()
    # "ours" is what `moelab train` runs (chunked LM loss, no logits tensor);
    # "ours_logits" materialises the logits and calls F.cross_entropy, as HF does.
    runners["ours"] = _step_fn(ours, inputs, targets, return_logits=False)
    params["ours"] = ours.num_params()
    ours_logits = Transformer(cfg).train()
    runners["ours_logits"] = _step_fn(ours_logits, inputs, targets, return_logits=True)
    params["ours_logits"] = ours_logits.num_params()
    errors: dict[str, str] = {}
    for impl in HF_IMPLS:
        name = f"hf_{impl}"
        try:
            model = build_hf(cfg, impl)
            fn = _hf_step(model, x)
            fn()  # fail fast if this implementation cannot run here
        except Exception as exc:  # a failing implementation is a result, not a crash
            errors[name] = f"{type(exc).__name__}: {exc}"[:300]
            log.warning("%s does not run: %s", name, errors[name])
            continue
        runners[name] = fn
        params[name] = sum(p.numel() for p in model.parameters())
    times: dict[str, list[float]] = {k: [] for k in runners}
    for i in range(warmup + steps):
        for name, fn in runners.items():
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if i >= warmup:
                times[name].append(dt)
    tokens = batch_size * seq_len
    rows = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        rows[name] = {"step_ms": med * 1e3, "tokens_per_s": tokens / med, "params": params[name],
                      "min_step_ms": min(ts) * 1e3, "steps": len(ts)}
    hf_default = rows.get("hf_eager")
    best_hf = max((r for k, r in rows.items() if k.startswith("hf_")), key=lambda r: r["tokens_per_s"], default=None)
    return {
        "benchmark": "train_throughput",
        "model": model_name,
        "config": cfg.to_dict(),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "threads": threads,
        "dtype": "float32",
        "rows": rows,
        "errors": errors,
        "speedup_vs_hf_eager": rows["ours"]["tokens_per_s"] / hf_default["tokens_per_s"] if hf_default else None,
        "speedup_vs_best_hf": rows["ours"]["tokens_per_s"] / best_hf["tokens_per_s"] if best_hf else None,
        "machine": machine_info(),
    }


def _hf_step(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], float]:
    """HF computes the shifted LM loss from `labels` = the inputs themselves."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
    inputs = x[:, :-1].contiguous()
    # Labels over T+1 tokens would need T+1 inputs; give HF the T inputs and let it shift:
    # it then predicts T-1 targets (one fewer than ours, < 1% of the work at T=128).
    def step() -> float:
        loss = model(input_ids=inputs, labels=inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-moe")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=12, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.add_argument("--out", default=None, metavar="PATH", help="also write the JSON result here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = run(args.model, args.batch_size, args.seq_len, args.steps, args.warmup, args.threads)
    print(f"{args.model}  batch {args.batch_size} x {args.seq_len}  fp32 CPU, {result['threads']} threads")
    print(f"{'impl':<16}{'params':>10}{'ms/step':>10}{'tokens/s':>10}")
    for name, r in result["rows"].items():
        print(f"{name:<16}{r['params']:>10}{r['step_ms']:>10.1f}{r['tokens_per_s']:>10.0f}")
    for name, err in result["errors"].items():
        print(f"{name:<16}  did not run: {err}")
    if result["speedup_vs_hf_eager"]:
        print(f"ours / hf_eager: {result['speedup_vs_hf_eager']:.2f}x   "
              f"ours / best hf: {result['speedup_vs_best_hf']:.2f}x")
    if args.out:
        atomic_write_json(args.out, result)
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
