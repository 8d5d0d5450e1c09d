"""Sweeps for the two experiments whose settings decide what they can show.

    python -m benchmarks.sweep quality     --out runs/sweep/quality     [--workers N] [--budget-s S]
    python -m benchmarks.sweep quality2    --out runs/sweep/quality2    (round 2: shared + fine-grained)
    python -m benchmarks.sweep quality3    --out runs/sweep/quality3    (round 3: narrow models, CPU)
    python -m benchmarks.sweep quality4    --out runs/sweep/quality4    (round 4: the demo's budget, CPU)
    python -m benchmarks.sweep quality4b   --out runs/sweep/quality4b   (round 4b: screening designs)
    python -m benchmarks.sweep quality4c   --out runs/sweep/quality4c   (round 4c: the aux coefficient)
    python -m benchmarks.sweep quality4d   --out runs/sweep/quality4d   (round 4d: the demo's scale, 2 seeds)
    python -m benchmarks.sweep quality5    --out runs/sweep/quality5    (round 5: d_model 64, 2 seeds)
    python -m benchmarks.sweep quality6    --out runs/sweep/quality6    (round 6: the experts' lr, 2 seeds)
    python -m benchmarks.sweep quality7    --out runs/sweep/quality7    (round 7: weight decay, 2 seeds)
    python -m benchmarks.sweep quality8    --out runs/sweep/quality8    (round 8: vocabulary, first dense layer)
    python -m benchmarks.sweep quality9    --out runs/sweep/quality9    (round 9: 8x the tokens, 2 seeds)
    python -m benchmarks.sweep instability --out runs/sweep/instability [--workers N] [--budget-s S]
    (--device cuda --precision fp32 --cache-entry runs/cache/data/<entry> on a GPU machine)

``quality``: at which scale does the MoE reach its matched-active dense model's final
validation loss in fewer steps (the `moelab compare` target)? Each variant changes a
few settings of the tiny pair (model shape, experts, batch, steps, lr, vocabulary) and
trains the MoE and its dense sibling (FFN width = the MoE's active width) on the same
token stream; a few also train the dense model with the MoE's total width.

``instability``: which setting makes router logits grow until the loss spikes or turns
NaN (the `moelab lab instability` broken run)? Variants of learning rate, router init,
warmup, clipping, Adam beta2 and precision on the lab's model, without z-loss.

Runs go to a process pool (one training run per task; on a GPU many small runs share
the card). Every finished run is appended to ``OUT/runs.jsonl`` at once, so a sweep cut
short keeps what it did; ``--budget-s`` stops submitting new runs after that many
seconds and ``OUT/summary.json`` (written atomically at the end) pairs them up.

The runs themselves are ordinary `moelab.train.train` runs; with ``--precision fp32`` a
GPU follows the CPU's maths, so the variants that look best can be checked with
`moelab compare` / `moelab lab` on the CPU (BENCHMARKS.md has both).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import logging
import math
import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from moelab.io import atomic_write_json

log = logging.getLogger("benchmarks.sweep")

# --------------------------------------------------------------------------- quality grid

# The tiny pair (moelab.model.presets "tiny-*"), as keyword settings a variant overrides.
QUALITY_BASE: dict[str, Any] = dict(
    d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, num_experts=8, top_k=2, d_expert=256,
    shared=0, d_shared=None, vocab=8192,
    steps=600, batch_size=8, seq_len=128, lr=3e-3, aux=0.01, bias_rate=0.0, renorm=True, seed=0, scale=1.0,
    expert_lr=1.0, expert_wd=None, wd=0.1, first_dense=0,
)

# name -> overrides, in priority order (a budget-cut sweep runs the first ones).
QUALITY_VARIANTS: dict[str, dict[str, Any]] = {
    "base": {},
    "bs32": dict(batch_size=32),
    "steps1200": dict(steps=1200),
    "bs32-steps1200": dict(batch_size=32, steps=1200),
    "E32k4s1": dict(num_experts=32, top_k=4, d_expert=64, shared=1, d_shared=256),
    "E16k4": dict(num_experts=16, top_k=4, d_expert=128),
    "E64k8": dict(num_experts=64, top_k=8, d_expert=64),
    "E16k2-de256": dict(num_experts=16),
    "lr6e-3": dict(lr=6e-3),
    "lr1.5e-3": dict(lr=1.5e-3),
    "d64": dict(d_model=64, n_heads=4, n_kv_heads=2),
    "v2048": dict(vocab=2048),
    "v4096": dict(vocab=4096),
    "bs32-E32k4s1": dict(batch_size=32, num_experts=32, top_k=4, d_expert=64, shared=1, d_shared=256),
    "bs32-E16k4": dict(batch_size=32, num_experts=16, top_k=4, d_expert=128),
    "bs32-v2048": dict(batch_size=32, vocab=2048),
    "d64-bs32-steps1200": dict(d_model=64, batch_size=32, steps=1200),
    "d64-v2048-bs32-steps1200": dict(d_model=64, vocab=2048, batch_size=32, steps=1200),
    "bs16": dict(batch_size=16),
    "steps2400": dict(steps=2400),
    "E8k1-de512": dict(top_k=1, d_expert=512),
    "aux1e-3": dict(aux=1e-3),
    "L2": dict(n_layers=2),
    "L8": dict(n_layers=8),
    "seq256": dict(seq_len=256),
    "lr6e-3-bs32": dict(lr=6e-3, batch_size=32),
    "bs32-steps1200-E32k4s1": dict(batch_size=32, steps=1200, num_experts=32, top_k=4, d_expert=64, shared=1,
                                   d_shared=256),
    "bs32-steps1200-v2048-E16k4": dict(batch_size=32, steps=1200, vocab=2048, num_experts=16, top_k=4,
                                       d_expert=128),
    "bs64-steps1200": dict(batch_size=64, steps=1200),
    "d64-L2-bs32-steps2400": dict(d_model=64, n_layers=2, batch_size=32, steps=2400),
}
# Round 2, after round 1 (BENCHMARKS.md): a shared expert with fine-grained routed experts
# was the only design ahead of dense, so vary it at CPU-affordable scales, plus a second
# seed. "_roles" limits the runs where the dense model equals another variant's.
FG = dict(num_experts=32, top_k=4, d_expert=64, shared=1, d_shared=256)  # tiny-finegrained-moe
QUALITY2_VARIANTS: dict[str, dict[str, Any]] = {
    "seed1": dict(seed=1),
    "E32k4s1-seed1": dict(FG, seed=1, _roles=("moe",)),
    "E16k2s1": dict(num_experts=16, top_k=2, d_expert=128, shared=1, d_shared=256, _roles=("moe",)),
    "E8k1s1": dict(num_experts=8, top_k=1, d_expert=256, shared=1, d_shared=256, _roles=("moe",)),
    "E64k4s1": dict(FG, num_experts=64, _roles=("moe",)),
    "E64k8s1-de32": dict(FG, num_experts=64, top_k=8, d_expert=32, _roles=("moe",)),
    "E32k4s1-lr2e-3": dict(FG, lr=2e-3, _roles=("moe",)),
    "E32k4s1-lr4e-3": dict(FG, lr=4e-3, _roles=("moe",)),
    "E32k4s1-auxfree": dict(FG, aux=0.0, bias_rate=1e-3, _roles=("moe",)),
    "E32k4s1-aux1e-3": dict(FG, aux=1e-3, _roles=("moe",)),
    "E32k4s1-bs16": dict(FG, batch_size=16),
    "E16k2s1-bs16": dict(num_experts=16, top_k=2, d_expert=128, shared=1, d_shared=256, batch_size=16,
                         _roles=("moe",)),
    "E32k6s1-ds128": dict(FG, top_k=6, d_shared=128, _roles=("moe",)),
    "norenorm": dict(renorm=False, _roles=("moe",)),
    "auxfree": dict(aux=0.0, bias_rate=1e-3, _roles=("moe",)),
    "E32k4s1-steps1200": dict(FG, steps=1200),
    # Round 3 (CPU): renormalised top-k weights sum to 1, so the routed output is an
    # average of k experts where a dense FFN of the same active width sums its halves;
    # scaling the weights by k restores the dense output scale.
    "scale2": dict(scale=2.0, _roles=("moe",)),
    "E32k4s1-scale4": dict(FG, scale=4.0, _roles=("moe",)),
}
# Round 3 (CPU): narrower models, where FFN capacity should matter more (d64 tied
# where d128 trailed in round 1), with the experts' width kept or grown.
QUALITY3_VARIANTS: dict[str, dict[str, Any]] = {
    "d32": dict(d_model=32, n_heads=2, n_kv_heads=1),
    "d32-de512": dict(d_model=32, n_heads=2, n_kv_heads=1, d_expert=512),
    "d64-de512": dict(d_model=64, d_expert=512),
    "d32-E32k4s1": dict(FG, d_model=32, n_heads=2, n_kv_heads=1),
    # after the first four: the fine-grained + shared design at d_model 32 led (0.78x)
    "d32-E64k4s1": dict(FG, num_experts=64, d_model=32, n_heads=2, n_kv_heads=1, _roles=("moe",)),
    "d32-E32k4s1-seed1": dict(FG, d_model=32, n_heads=2, n_kv_heads=1, seed=1),
    "d32-E32k4s1-de128": dict(FG, d_expert=128, d_model=32, n_heads=2, n_kv_heads=1),
    "d32-E64k8s1": dict(FG, num_experts=64, top_k=8, d_shared=256, d_model=32, n_heads=2, n_kv_heads=1),
}
# Round 4 (CPU, issue #17): the demo's budget (~600 steps x batch 8 of tokens for three
# models in ~6 minutes on 2 cores), searching for the fine-grained + shared MoE reaching
# its dense twin in <= 0.8x the steps in two seeds. Every variant is run for seeds 0 and
# 1 (`seed_pairs`).
QUALITY4_VARIANTS: dict[str, dict[str, Any]] = {
    "fg-s300": dict(FG, steps=300),
    "fg-bs16-s300": dict(FG, batch_size=16, steps=300),
}
# Round 4b: screening at 300 steps, seed 0, MoE only (the dense model is fg-s300-seed0's):
# fewer experts see more tokens each (the budget, not capacity, limits), less aux loss,
# more of the active width routed.
QUALITY4B_VARIANTS: dict[str, dict[str, Any]] = {
    "fg-aux1e-3-s300": dict(FG, aux=1e-3, steps=300, _roles=("moe",)),
    "E16k4s1-s300": dict(FG, num_experts=16, steps=300, _roles=("moe",)),
    "E32k6s1-ds128-s300": dict(FG, top_k=6, d_shared=128, steps=300, _roles=("moe",)),
    "E8k2s1-de128-s300": dict(FG, num_experts=8, top_k=2, d_expert=128, steps=300, _roles=("moe",)),
}
# Round 4c: after 4b (aux 1e-3 and 16 experts both lost ground to fg-s300): balance harder.
QUALITY4C_VARIANTS: dict[str, dict[str, Any]] = {
    "fg-aux3e-2-s300": dict(FG, aux=3e-2, steps=300, _roles=("moe",)),
    "fg-aux1e-1-s300": dict(FG, aux=1e-1, steps=300, _roles=("moe",)),
}
# Round 4d: the demo's scale (600 x 8, TrainConfig's defaults, fp32) over seeds 0 and 1:
# tiny-finegrained-moe with its dense twin (what the demo trains), and the aux 0.1 lead of
# 4c (MoE only: its dense model is fg's of the same seed).
QUALITY4D_VARIANTS: dict[str, dict[str, Any]] = {
    "fg": dict(FG),
    "fg-aux1e-1": dict(FG, aux=1e-1, _roles=("moe",)),
}

# Round 5 (CPU, issue #17, 2026-12-02): round 3 found narrow models favouring the MoE
# (d_model 32 reached 0.78x in one seed and lost in the next), and d_model 64 trains
# faster per step than 128, so the demo's minutes buy more steps. The fine-grained +
# shared design at d_model 64, over two seeds, at the demo's scale and at 2x its steps.
QUALITY5_VARIANTS: dict[str, dict[str, Any]] = {
    "d64-fg": dict(FG, d_model=64),
    "d64-fg-s1200": dict(FG, d_model=64, steps=1200),
    # after the first pair (0.795x and 0.92x: the seeds disagree): twice the batch, which
    # halves the gradient noise of batches mixing four domains of very different loss.
    "d64-fg-bs16": dict(FG, d_model=64, batch_size=16),
    # MoE only (`*`: against d64-fg's dense run of the same seed): more routed capacity
    # (64 experts), and finer experts at the same active width (64 of F=32, top-8).
    "d64-E64k4s1": dict(FG, d_model=64, num_experts=64, _roles=("moe",)),
    "d64-E64k8s1-de32": dict(FG, d_model=64, num_experts=64, top_k=8, d_expert=32, _roles=("moe",)),
    # At d_model 64 the MoE starts *behind* its dense twin (+0.04 and +0.12 at step 50, seeds
    # 0 and 1) where at 128 it led early: renormalised top-4 weights make the routed half of
    # the active width a mean of 4 experts, a quarter of a dense FFN's output scale. Scaling
    # them by k (`routed_scaling_factor`, DeepSeek-V3's knob) gives the dense scale back.
    "d64-fg-scale4": dict(FG, d_model=64, scale=4.0, _roles=("moe",)),
}
# Round 6 (CPU, 2026-12-02): the routed experts' learning rate. A routed expert's
# down-projection sums 64 hidden units where the dense twin's sums 512, and it gets a
# gradient from an eighth of the tokens, so one Adam step moves its output ~8x less than
# the dense FFN's at the same lr (the muP argument for narrow layers). `expert_lr` scales
# the schedule for the routed experts' weights only (`*`: MoE-only, against fg's dense run).
QUALITY6_VARIANTS: dict[str, dict[str, Any]] = {
    "fg-elr2": dict(FG, expert_lr=2.0, _roles=("moe",)),
    "fg-elr4": dict(FG, expert_lr=4.0, _roles=("moe",)),
    # after elr2 lost in both seeds (+0.028, +0.039 against fg): the other way. Adam's
    # step on a weight whose gradient is zero on most steps is already large when one comes.
    "fg-elr0.5": dict(FG, expert_lr=0.5, _roles=("moe",)),
    # The demo's time left over once its models train side by side (5.9 of ~10 minutes)
    # buys about twice the tokens: batch 16 (half the gradient noise of batches that mix
    # four domains of very different loss), both models.
    "fg-bs16": dict(FG, batch_size=16),
    # More of the active width routed: a shared expert of 128 and 6 of the 32 (active 512).
    "fg-k6-ds128": dict(FG, top_k=6, d_shared=128, _roles=("moe",)),
}

# Round 7 (CPU, 2026-12-02): weight decay. AdamW shrinks every matrix by lr x wd each step
# (0.1 here: ~16% over the run), the routed experts too, though each is trained by a
# fraction of the tokens; the dense twin's FFN by all of them. `expert_wd` sets the routed
# experts' decay alone (MoE only), `wd` every matrix's in both models.
QUALITY7_VARIANTS: dict[str, dict[str, Any]] = {
    "fg-ewd0": dict(FG, expert_wd=0.0, _roles=("moe",)),
    "fg-wd0": dict(FG, wd=0.0),
}

# Round 8 (CPU, 2026-12-02): where the FFN holds more of the model. At vocabulary 8192 and
# d_model 128 the embedding and output matrices are 2.1M of the dense twin's 3.08M weights
# and half its FLOPs, so most of what 0.6M tokens teach is lexical, which the experts do not
# hold. At 2048 the FFNs are most of the model (both models; steps are cheaper too). And
# DeepSeek's first dense layer (`first_k_dense_replace`): layer 0's routing sees token
# embeddings alone and balances worst, so it trains as the dense twin's FFN (MoE only;
# active FLOPs unchanged, 7/8 of layer 0's routed weights gone).
QUALITY8_VARIANTS: dict[str, dict[str, Any]] = {
    "fg-v2048": dict(FG, vocab=2048),
    "fg-first-dense": dict(FG, first_dense=1, _roles=("moe",)),
}

# Round 9 (CPU, 2026-12-02): 8x the demo's tokens (batch 32 x 1200 steps, 4.9M tokens), the
# scale at which the H100 sweep's top-2 MoE still trailed (`bs32-steps1200`, +0.0075): does
# the fine-grained MoE's lead in nats grow with the tokens until 0.8x is in reach?
QUALITY9_VARIANTS: dict[str, dict[str, Any]] = {
    "fg-bs32-s1200": dict(FG, batch_size=32, steps=1200),
    # after seed 0 (the lead fell from -0.06 at step 100 to -0.003 at 1200, while the H100
    # sweep's dense model of the MoE's total width pulled ahead at this many tokens): is it
    # the balance the aux loss imposes on every batch? DeepSeek-V3's bias balancing instead
    # (aux 0, bias rate 1e-3; MoE only, against fg-bs32-s1200's dense runs).
    "fg-bs32-s1200-auxfree": dict(FG, batch_size=32, steps=1200, aux=0.0, bias_rate=1e-3, _roles=("moe",)),
}


def seed_pairs(variants: dict[str, dict[str, Any]], seeds: tuple[int, ...] = (0, 1)) -> dict[str, dict[str, Any]]:
    """Each variant once per seed, named ``<variant>-seed<s>``."""
    return {f"{name}-seed{s}": dict(over, seed=s) for name, over in variants.items() for s in seeds}


# Variants that also train the dense model with the MoE's total FFN width.
QUALITY_WITH_TOTAL = {"base", "bs32-steps1200", "d64-bs32-steps1200", "bs32-v2048", "bs64-steps1200"}


def quality_models(s: dict[str, Any]) -> dict[str, Any]:
    """{role: ModelConfig} for one quality variant's settings."""
    from moelab.model import ModelConfig
    from moelab.moe import MoEConfig, active_ffn_hidden

    moe = MoEConfig(d_model=s["d_model"], d_expert=s["d_expert"], num_experts=s["num_experts"], top_k=s["top_k"],
                    num_shared_experts=s["shared"], d_shared_expert=s["d_shared"], aux_loss_coef=s["aux"],
                    z_loss_coef=0.001, bias_update_rate=s["bias_rate"], norm_topk_prob=s["renorm"],
                    routed_scaling_factor=s["scale"])
    base = ModelConfig(vocab_size=s["vocab"], d_model=s["d_model"], n_layers=s["n_layers"], n_heads=s["n_heads"],
                       n_kv_heads=s["n_kv_heads"], d_ff=active_ffn_hidden(moe), max_seq_len=max(512, s["seq_len"]))
    total_ff = s["num_experts"] * s["d_expert"] + s["shared"] * (s["d_shared"] or s["d_expert"])
    return {"moe": base.with_(moe=moe, first_dense_layers=s["first_dense"]), "dense": base,
            "dense_total": base.with_(d_ff=total_ff)}


def quality_tasks(variants: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    tasks = []
    for name, over in variants.items():
        s = {**QUALITY_BASE, **over}
        roles = s.pop("_roles", None) or (["moe", "dense"] + (["dense_total"] if name in QUALITY_WITH_TOTAL else []))
        for role in roles:
            train = dict(steps=s["steps"], batch_size=s["batch_size"], seq_len=s["seq_len"], lr=s["lr"],
                         seed=s["seed"], weight_decay=s["wd"])
            tasks.append(dict(grid="quality", variant=name, role=role, settings=s, train=train, vocab=s["vocab"]))
    return tasks


# --------------------------------------------------------------------------- instability grid

# The lab's model (moelab.lab.failures.LabConfig defaults) without z-loss.
INSTABILITY_BASE: dict[str, Any] = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, num_experts=8, top_k=2,
                                        d_expert=128, steps=300, batch_size=16, seq_len=64, router_std=0.5,
                                        lr=3e-2, warmup=30, grad_clip=1.0, beta2=0.95, precision="fp32", z=0.0)


def instability_tasks() -> list[dict[str, Any]]:
    grid = []
    for lr in (1e-2, 3e-2, 1e-1, 3e-1):
        for std in (0.5, 4.0):
            for clip in (1.0, 0.0):
                for warmup in (30, 0):
                    grid.append(dict(lr=lr, router_std=std, grad_clip=clip, warmup=warmup))
    # Fewer, targeted: beta2, bf16 autocast, a bigger model, a longer run.
    for lr in (3e-2, 1e-1):
        grid.append(dict(lr=lr, beta2=0.99, grad_clip=0.0, warmup=0))
        grid.append(dict(lr=lr, beta2=0.999, grad_clip=0.0, warmup=0))
        grid.append(dict(lr=lr, precision="bf16", grad_clip=0.0, warmup=0, router_std=4.0))
        grid.append(dict(lr=lr, d_model=128, n_layers=4, d_expert=256, grad_clip=0.0, warmup=0))
        grid.append(dict(lr=lr, steps=1000, grad_clip=0.0, warmup=0, router_std=4.0))
    tasks = []
    for over in grid:
        s = {**INSTABILITY_BASE, **over}
        name = "-".join(f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}" for k, v in sorted(over.items()))
        for z in (0.0, 1e-2):  # broken and z-loss-cured, same everything else
            train = dict(steps=s["steps"], batch_size=s["batch_size"], seq_len=s["seq_len"], lr=s["lr"],
                         warmup_steps=s["warmup"], grad_clip=s["grad_clip"], beta2=s["beta2"],
                         precision=s["precision"])
            tasks.append(dict(grid="instability", variant=name, role=f"z{z:g}", settings={**s, "z": z},
                              train=train, vocab=8192))
    return tasks


def instability_model(s: dict[str, Any], vocab: int):
    from moelab.model import ModelConfig
    from moelab.moe import MoEConfig

    moe = MoEConfig(d_model=s["d_model"], d_expert=s["d_expert"], num_experts=s["num_experts"], top_k=s["top_k"],
                    aux_loss_coef=0.01, z_loss_coef=s["z"])
    return ModelConfig(vocab_size=vocab, d_model=s["d_model"], n_layers=s["n_layers"], n_heads=s["n_heads"],
                       n_kv_heads=s["n_kv_heads"], d_ff=s["top_k"] * s["d_expert"], moe=moe, max_seq_len=512)


# --------------------------------------------------------------------------- running one task


def _load_data(cache_entries: dict[int, str], vocab: int):
    from moelab.data import load_cache_entry, prepare_data

    if vocab in cache_entries:
        return load_cache_entry(cache_entries[vocab])
    return prepare_data(vocab_size=vocab)


_BUILD_OPTIMIZER = None  # the trainer's own, kept before the first `_set_expert_group`


def _set_expert_group(lr_scale: float, weight_decay: float | None) -> None:
    """In this worker, from now on: the routed experts' weights in their own AdamW group
    whose lr is `lr_scale` x the schedule (the trainer multiplies each group's lr by its
    "lr_scale") and whose decay is `weight_decay` (None: the other matrices'); ``(1.0,
    None)`` puts the trainer's own optimizer back. Set for every task, since a pool's
    worker runs many."""
    global _BUILD_OPTIMIZER
    import moelab.train.trainer as trainer

    if _BUILD_OPTIMIZER is None:
        _BUILD_OPTIMIZER = trainer.build_optimizer
    base = _BUILD_OPTIMIZER
    if lr_scale == 1.0 and weight_decay is None:
        trainer.build_optimizer = base
        return

    def build(model, cfg, *, fused=False):
        opt = base(model, cfg, fused=fused)
        experts = {id(p) for n, p in model.named_parameters() if ".mlp.experts." in n}
        decay = opt.param_groups[0]
        keep = [p for p in decay["params"] if id(p) not in experts]
        moved = [p for p in decay["params"] if id(p) in experts]
        decay["params"] = keep
        wd = decay["weight_decay"] if weight_decay is None else weight_decay
        opt.add_param_group({"params": moved, "weight_decay": wd, "lr_scale": lr_scale})
        return opt

    trainer.build_optimizer = build


def run_task(task: dict[str, Any], runs_root: str, device: str, precision: str, cache_entries: dict[int, str]) -> dict:
    """One training run (in a worker process); returns a JSON-able summary."""
    import torch

    from moelab.lab.failures import count_spikes, scale_router_init
    from moelab.model import Transformer
    from moelab.train import TrainConfig, train
    from moelab.train.metrics import read_metrics

    torch.set_num_threads(1)
    if device == "cuda":  # fp32 means fp32: no TF32 matmuls
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    data = _load_data(cache_entries, task["vocab"])
    s = task["settings"]
    run_dir = Path(runs_root) / task["grid"] / task["variant"] / task["role"]
    train_kw = {"precision": precision, **task["train"]}
    train_cfg = TrainConfig(device=device, eval_interval=25, checkpoint_interval=0, log_interval=50,
                            **{"seed": 0, "eval_batches": 4, **train_kw})
    model = None
    if task["grid"] == "quality":
        cfg = quality_models(s)[task["role"]]
    else:
        cfg = instability_model(s, data.vocab_size)
        torch.manual_seed(0)
        model = Transformer(cfg)
        scale_router_init(model, s["router_std"], seed=0)
    if task["grid"] == "quality":
        _set_expert_group(s.get("expert_lr", 1.0), s.get("expert_wd"))
    else:
        _set_expert_group(1.0, None)
    t0 = time.perf_counter()
    result = train(cfg, train_cfg, data, run_dir, progress=False, tensorboard=False, overwrite=True, model=model)
    rows = read_metrics(run_dir, kind="train")
    loss = np.array([r["loss"] for r in rows], dtype=np.float64)
    peak = max((max(v["max_router_logit"] for v in r["layers"].values()) for r in rows if r.get("layers")),
               default=None)
    return dict(
        grid=task["grid"], variant=task["variant"], role=task["role"], settings=s, train=train_kw,
        val_loss=result.val_loss, val_loss_by_domain=result.val_loss_by_domain, steps_done=result.steps_done,
        history=[{"step": h["step"], "val_loss": h["val_loss"]} for h in result.history],
        step_time_s=result.step_time_s, wall_s=time.perf_counter() - t0, stopped_reason=result.stopped_reason,
        nan_steps=result.nan_steps, loss_spikes=count_spikes(loss, 1.5) if len(loss) else 0,
        peak_router_logit=peak, max_loss_after_10=float(np.nanmax(loss[10:])) if len(loss) > 10 else None,
        final_train_loss=float(loss[-1]) if len(loss) else None,
    )


# --------------------------------------------------------------------------- summary


def summarize(rows: list[dict]) -> dict:
    from moelab.train.compare import steps_to_reach

    by_variant: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_variant.setdefault(f"{r['grid']}/{r['variant']}", {})[r["role"]] = r
    out: dict[str, Any] = {}
    for key, runs in by_variant.items():
        entry: dict[str, Any] = {"settings": next(iter(runs.values()))["settings"]}
        for role, r in runs.items():
            entry[role] = {k: r[k] for k in ("val_loss", "steps_done", "step_time_s", "stopped_reason", "nan_steps",
                                              "loss_spikes", "peak_router_logit", "max_loss_after_10")}
        moe, dense = runs.get("moe"), runs.get("dense")
        if moe and dense and dense["val_loss"] is not None and moe["val_loss"] is not None:
            steps = steps_to_reach(moe["history"], dense["val_loss"])
            entry["moe_minus_dense_val_loss"] = moe["val_loss"] - dense["val_loss"]
            entry["moe_steps_to_dense_loss_ratio"] = None if steps is None else steps / dense["steps_done"]
            entry["step_time_ratio"] = moe["step_time_s"] / dense["step_time_s"]
        out[key] = entry
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("grid", choices=["quality", "quality2", "quality3", "quality4", "quality4b", "quality4c", "quality4d",
                                    "quality5", "quality6", "quality7", "quality8", "quality9", "instability"])
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16"],
                   help="default precision of the runs (an instability variant may set its own)")
    p.add_argument("--budget-s", type=float, default=math.inf, help="submit no new run after this many seconds")
    p.add_argument("--cache-entry", action="append", default=[], metavar="DIR",
                   help="prepared-data cache entries to load as they are (see moelab.data.load_cache_entry); "
                   "matched to runs by vocabulary size")
    p.add_argument("--only", nargs="*", help="variant names to run (default all)")
    p.add_argument("--runs-dir", default=None, help="where the run directories go (default OUT/runs)")
    p.add_argument("--max-steps", type=int, default=None, help="cap every run's steps (a smoke test)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from moelab.data import load_cache_entry
    from moelab.errors import MoelabError

    cache_entries = {}
    for entry in args.cache_entry:
        try:  # checked here, once, with a clear error, before any worker starts
            cache_entries[load_cache_entry(entry).vocab_size] = entry
        except MoelabError as e:
            p.error(f"--cache-entry {entry}: {e}")
    tasks = {"quality": lambda: quality_tasks(QUALITY_VARIANTS), "quality2": lambda: quality_tasks(QUALITY2_VARIANTS),
             "quality3": lambda: quality_tasks(QUALITY3_VARIANTS),
             "quality4": lambda: quality_tasks(seed_pairs(QUALITY4_VARIANTS)),
             "quality4b": lambda: quality_tasks(QUALITY4B_VARIANTS),
             "quality4c": lambda: quality_tasks(QUALITY4C_VARIANTS),
             "quality4d": lambda: quality_tasks(seed_pairs(QUALITY4D_VARIANTS)),
             "quality5": lambda: quality_tasks(seed_pairs(QUALITY5_VARIANTS)),
             "quality6": lambda: quality_tasks(seed_pairs(QUALITY6_VARIANTS)),
             "quality7": lambda: quality_tasks(seed_pairs(QUALITY7_VARIANTS)),
             "quality8": lambda: quality_tasks(seed_pairs(QUALITY8_VARIANTS)),
             "quality9": lambda: quality_tasks(seed_pairs(QUALITY9_VARIANTS)),
             "instability": instability_tasks}[args.grid]()
    if args.only:
        tasks = [t for t in tasks if t["variant"] in set(args.only)]
    if args.max_steps:
        for t in tasks:
            t["train"]["steps"] = min(t["train"]["steps"], args.max_steps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "runs.jsonl"
    rows: list[dict] = []
    start = time.perf_counter()
    ctx = mp.get_context("spawn")  # CUDA cannot be forked
    with cf.ProcessPoolExecutor(max_workers=args.workers, mp_context=ctx) as pool:
        pending: dict[cf.Future, dict] = {}
        queue = list(tasks)
        while queue or pending:
            while queue and len(pending) < args.workers and time.perf_counter() - start < args.budget_s:
                t = queue.pop(0)
                pending[pool.submit(run_task, t, args.runs_dir or str(out / "runs"), args.device, args.precision, cache_entries)] = t
            if not pending:
                break
            done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                t = pending.pop(fut)
                try:
                    row = fut.result()
                except Exception as e:  # one failed run must not lose the others
                    row = dict(grid=t["grid"], variant=t["variant"], role=t["role"], error=f"{type(e).__name__}: {e}")
                    log.warning("%s/%s failed: %s", t["variant"], t["role"], row["error"])
                else:
                    rows.append(row)
                    log.info("%-30s %-12s val %.4f  %.0fs  spikes %s nan %s peak %s", t["variant"], t["role"],
                             row["val_loss"] if row["val_loss"] is not None else float("nan"), row["wall_s"],
                             row["loss_spikes"], row["nan_steps"], row["peak_router_logit"])
                with open(log_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
        skipped = len(queue)
    summary = summarize(rows)
    atomic_write_json(out / "summary.json", {"grid": args.grid, "device": args.device, "precision": args.precision,
                                        "wall_s": time.perf_counter() - start, "skipped_runs": skipped,
                                        "variants": summary})
    for key, e in summary.items():
        if "moe_steps_to_dense_loss_ratio" in e:
            r = e["moe_steps_to_dense_loss_ratio"]
            tot = e.get("dense_total", {}).get("val_loss")
            print(f"{key:45s} moe-dense {e['moe_minus_dense_val_loss']:+.4f}  steps ratio "
                  f"{'never' if r is None else f'{r:.2f}'}  moe {e['moe']['val_loss']:.4f} dense "
                  f"{e['dense']['val_loss']:.4f} total {tot if tot is None else round(tot, 4)}  "
                  f"time x{e['step_time_ratio']:.2f}")
        else:
            print(f"{key:60s} " + "  ".join(
                f"{role}: spikes {r['loss_spikes']} nan {r['nan_steps']} peak "
                f"{'-' if r['peak_router_logit'] is None else round(r['peak_router_logit'], 1)} val "
                f"{'-' if r['val_loss'] is None else round(r['val_loss'], 3)}"
                for role, r in e.items() if role != "settings"))
    print(f"skipped (budget): {skipped} runs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
