"""Neutral, family-independent description of a transformer architecture.

`ArchSpec` holds exactly what parameter, FLOP and memory accounting needs:
vocabulary, width, and one `LayerSpec` per decoder layer (attention variant and
FFN kind). Hugging Face configs, moelab configs and presets are all converted
into it, so every count in `moelab size` comes out of one code path.

`ExplicitSpec` is the escape hatch for teaching models described by parameter
counts rather than layer shapes (the "textbook 8x7B").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from moelab.errors import ConfigError

NormKind = Literal["rms", "layernorm", "layernorm_nobias"]
QKNorm = Literal["none", "head", "full"]


def _positive(owner: str, **values: int | None) -> None:
    for name, value in values.items():
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise ConfigError(f"{owner}.{name} must be a positive int, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class AttentionSpec:
    """One attention block.

    kind="gqa" covers MHA (n_kv_heads == n_heads), GQA and MQA (n_kv_heads == 1).
    kind="mla" is DeepSeek's multi-head latent attention; it uses the `*_rank`
    and `qk_*_head_dim` / `v_head_dim` fields instead of `head_dim`/`n_kv_heads`.
    `window` is a sliding-window (or chunked-attention) span in tokens; None
    means the layer attends to the whole context.
    """

    kind: Literal["gqa", "mla"] = "gqa"
    n_heads: int
    n_kv_heads: int = 0
    head_dim: int = 0
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: QKNorm = "none"
    sinks: bool = False
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    window: int | None = None

    def __post_init__(self) -> None:
        _positive("AttentionSpec", n_heads=self.n_heads, window=self.window)
        if self.kind == "gqa":
            _positive("AttentionSpec", n_kv_heads=self.n_kv_heads, head_dim=self.head_dim)
            if self.n_heads % self.n_kv_heads:
                raise ConfigError(
                    f"AttentionSpec.n_heads ({self.n_heads}) must be a multiple of "
                    f"n_kv_heads ({self.n_kv_heads})"
                )
        elif self.kind == "mla":
            _positive(
                "AttentionSpec",
                q_lora_rank=self.q_lora_rank,
                kv_lora_rank=self.kv_lora_rank,
                qk_rope_head_dim=self.qk_rope_head_dim,
                v_head_dim=self.v_head_dim,
            )
        else:
            raise ConfigError(f"AttentionSpec.kind must be 'gqa' or 'mla', got {self.kind!r}")

    @property
    def qk_head_dim(self) -> int:
        """Width of one query/key head (MLA: no-RoPE part + RoPE part)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.kind == "mla" else self.head_dim

    @property
    def value_head_dim(self) -> int:
        return self.v_head_dim if self.kind == "mla" else self.head_dim


@dataclass(frozen=True, kw_only=True)
class MLPSpec:
    """A position-wise MLP: gated (SwiGLU: gate, up, down) or plain (up, down)."""

    d_ff: int
    gated: bool = True
    bias: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.d_ff, int) or self.d_ff < 0:
            raise ConfigError(f"MLPSpec.d_ff must be an int >= 0, got {self.d_ff!r}")


@dataclass(frozen=True, kw_only=True)
class MoESpec:
    """A routed-expert FFN: `top_k` of `num_experts` experts run per token.

    `shared` is the always-on path: DeepSeek's `n_shared_experts` experts are a
    single MLP of width n_shared * d_expert in every implementation we mirror, so
    they are one `MLPSpec` here and `num_shared` is kept for display only.
    """

    num_experts: int
    top_k: int
    expert: MLPSpec
    shared: MLPSpec | None = None
    num_shared: int = 0
    shared_gate: bool = False
    router_bias: bool = False
    router_noise: bool = False

    def __post_init__(self) -> None:
        _positive("MoESpec", num_experts=self.num_experts, top_k=self.top_k)
        if self.top_k > self.num_experts:
            raise ConfigError(
                f"MoESpec.top_k ({self.top_k}) must be <= num_experts ({self.num_experts})"
            )


@dataclass(frozen=True, kw_only=True)
class LayerSpec:
    attention: AttentionSpec
    ffn: MLPSpec | MoESpec


@dataclass(frozen=True, kw_only=True)
class ArchSpec:
    """A decoder-only transformer, layer by layer.

    Norms: `norms_per_layer` vectors of width d_model per layer (pre-attention
    and pre-FFN), plus one final norm when `final_norm`. `norm` says whether a
    norm has a weight (rms, layernorm_nobias) or weight + bias (layernorm).
    """

    name: str
    vocab_size: int
    d_model: int
    layers: tuple[LayerSpec, ...]
    norm: NormKind = "rms"
    norms_per_layer: int = 2
    final_norm: bool = True
    tie_embeddings: bool = False
    lm_head_bias: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        _positive("ArchSpec", vocab_size=self.vocab_size, d_model=self.d_model)
        if not self.layers:
            raise ConfigError(f"ArchSpec.layers of {self.name!r} is empty; need >= 1 layer")

    @property
    def n_layers(self) -> int:
        return len(self.layers)


@dataclass(frozen=True, kw_only=True)
class ExplicitSpec:
    """A model given by parameter counts, not shapes (for teaching examples).

    `shared_params` are always active (attention, norms, embeddings, any dense
    FFN), of which `embedding_params` are the input embedding table and
    `lm_head_params` the output head; each of `num_experts` experts holds
    `expert_params`, of which `top_k` run per token. `attention` and `n_layers`
    describe the attention stack only for KV-cache and attention-score FLOPs.
    """

    name: str
    shared_params: int
    expert_params: int
    num_experts: int
    top_k: int
    embedding_params: int = 0
    lm_head_params: int = 0
    n_layers: int = 1
    attention: AttentionSpec | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        _positive(
            "ExplicitSpec",
            shared_params=self.shared_params,
            expert_params=self.expert_params,
            num_experts=self.num_experts,
            top_k=self.top_k,
            n_layers=self.n_layers,
        )
        if self.top_k > self.num_experts:
            raise ConfigError(
                f"ExplicitSpec.top_k ({self.top_k}) must be <= num_experts ({self.num_experts})"
            )
        if self.embedding_params + self.lm_head_params > self.shared_params:
            raise ConfigError("ExplicitSpec: embedding + lm_head params exceed shared_params")


Spec = ArchSpec | ExplicitSpec
