"""moelab's own `ModelConfig` (and its presets and saved configs) -> `ArchSpec`.

So a user can size what they are about to train: `moelab size tiny-moe`, or a
run directory (its config.json read by `moelab.rundir.files.read_run_config`, the one
reader of a run's config). Only torch-free modules are imported here (`moelab.model.config`,
`moelab.model.presets`, `moelab.rundir.files`): sizing must start without torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moelab.accounting.spec import ArchSpec, AttentionSpec, LayerSpec, MLPSpec, MoESpec
from moelab.model.config import ModelConfig
from moelab.model.presets import PRESETS as MODEL_PRESETS
from moelab.rundir.files import config_path, model_config_of, read_run_config


def spec_from_moelab_config(cfg: Any, *, name: str = "moelab") -> ArchSpec:
    """Mirror `moelab.model.Transformer(cfg)`: RMSNorm pre-norm blocks, GQA with
    optional q/k/v biases and QK-norm, SwiGLU dense FFN of width d_ff, and MoE
    layers where `cfg.is_moe_layer(i)` holds (routed experts SwiGLU or GELU,
    fused shared experts with optional sigmoid gate, router with optional noise
    weights), final norm, LM head (tied or not)."""
    attn = AttentionSpec(
        n_heads=cfg.n_heads,
        n_kv_heads=cfg.kv_heads,
        head_dim=cfg.dim_head,
        qkv_bias=cfg.attn_bias,
        qk_norm=cfg.qk_norm or "none",
        window=cfg.sliding_window,
    )
    dense = MLPSpec(d_ff=cfg.d_ff)
    moe = None
    if cfg.moe is not None:
        m = cfg.moe
        gated = m.activation == "swiglu"
        moe = MoESpec(
            num_experts=m.num_experts,
            top_k=m.top_k,
            expert=MLPSpec(d_ff=m.d_expert, gated=gated),
            shared=MLPSpec(d_ff=m.shared_hidden, gated=gated) if m.num_shared_experts else None,
            num_shared=m.num_shared_experts,
            shared_gate=bool(m.num_shared_experts and m.shared_expert_gate),
            router_noise=m.noisy_gating,
        )
    layers = tuple(
        LayerSpec(attention=attn, ffn=moe if moe and cfg.is_moe_layer(i) else dense)
        for i in range(cfg.n_layers)
    )
    return ArchSpec(
        name=name,
        vocab_size=cfg.vocab_size,
        d_model=cfg.d_model,
        layers=layers,
        tie_embeddings=cfg.tie_embeddings,
    )


def moelab_presets() -> dict[str, ModelConfig]:
    """moelab's model presets (`moelab.model.presets`)."""
    return dict(MODEL_PRESETS)


def spec_from_moelab_run(path: str | Path) -> tuple[ArchSpec, str]:
    """The spec of a run's model and the config file it came from; a broken run config
    raises the `CheckpointError` every other reader of runs raises."""
    cfg = read_run_config(path)
    source = str(config_path(path))
    return spec_from_moelab_config(model_config_of(cfg, path), name=source), source
