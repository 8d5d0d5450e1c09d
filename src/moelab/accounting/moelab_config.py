"""moelab's own `ModelConfig` (and its presets and saved configs) -> `ArchSpec`.

So a user can size what they are about to train: `moelab size tiny-moe`, or a
folder whose config.json was written by moelab. `moelab.model` is imported
lazily: accounting must work (and its tests run) without torch models built.
"""

from __future__ import annotations

from typing import Any

from moelab.accounting.spec import ArchSpec, AttentionSpec, LayerSpec, MLPSpec, MoESpec
from moelab.errors import ConfigError


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


def moelab_presets() -> dict[str, Any]:
    """moelab's model presets ({} while `moelab.model` is not importable)."""
    try:
        from moelab.model.presets import PRESETS
    except ImportError:
        return {}
    return dict(PRESETS)


def is_moelab_config(raw: dict[str, Any]) -> bool:
    """A config.json written by moelab carries a "moelab" key or a "format" naming moelab."""
    return "moelab" in raw or "moelab" in str(raw.get("format", ""))


def spec_from_moelab_json(raw: dict[str, Any], *, source: str) -> ArchSpec:
    """The `ModelConfig.to_dict()` inside a moelab config.json: under "model" (or
    "model_config"), else the top-level object without its marker keys."""
    from moelab.model.config import ModelConfig

    body = raw.get("model", raw.get("model_config"))
    if not isinstance(body, dict):
        body = {k: v for k, v in raw.items() if k not in ("moelab", "format")}
    try:
        cfg = ModelConfig.from_dict(body)
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"{source}: not a valid moelab model config: {e}") from e
    return spec_from_moelab_config(cfg, name=str(raw.get("name", source)))
