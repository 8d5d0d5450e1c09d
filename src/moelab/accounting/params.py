"""Exact parameter counts of an `ArchSpec` (or `ExplicitSpec`), by component.

Notation: D = d_model, V = vocab_size, H = query heads, G = key/value heads,
d_h = head_dim, F = FFN hidden width, E = routed experts, K = experts per token.

Conventions (also printed by `moelab size` and documented in docs/size.md):
- "total" counts every parameter once; a tied LM head shares the embedding
  matrix, so it adds nothing.
- "active" counts what one token touches: everything except the E - K routed
  experts it skips, *including* the whole input embedding table (a row lookup
  costs no matmul FLOPs, but the table is a parameter of the model, and this is
  how Mixtral's 12.9B and DeepSeek-V3's 37B are quoted).
- "no_embed" drops the input embedding table and the LM head (untied) or the one
  shared matrix (tied); the LM head bias, if any, is dropped with it.
"""

from __future__ import annotations

from dataclasses import dataclass

from moelab.accounting.spec import (
    ArchSpec,
    AttentionSpec,
    ExplicitSpec,
    MLPSpec,
    MoESpec,
    Spec,
)


def attention_params(att: AttentionSpec, d_model: int) -> int:
    """Projection weights and biases of one attention block (norms excluded).

    GQA/MHA/MQA: q and o are D x (H d_h), k and v are D x (G d_h), so
        W = 2 D H d_h + 2 D G d_h,
    plus biases H d_h + 2 G d_h on q, k, v (`qkv_bias`) and D on o (`o_bias`),
    plus H per-head attention-sink logits (gpt-oss).

    MLA (DeepSeek-V2/V3): queries go through a low-rank bottleneck r_q
    (`q_a_proj` D x r_q, `q_b_proj` r_q x H(d_nope + d_rope)), or a direct
    D x H(d_nope + d_rope) projection when r_q is None; keys and values share a
    latent of rank r_kv, produced together with one shared RoPE key
    (`kv_a_proj_with_mqa` D x (r_kv + d_rope)) and expanded per head
    (`kv_b_proj` r_kv x H(d_nope + d_v)); `o_proj` is H d_v x D. Biases (when
    `qkv_bias`) sit on q_a_proj and kv_a_proj_with_mqa, and on o (`o_bias`).
    """
    d, h = d_model, att.n_heads
    if att.kind == "mla":
        qk = att.qk_nope_head_dim + att.qk_rope_head_dim
        if att.q_lora_rank is None:
            q = d * h * qk
        else:
            q = d * att.q_lora_rank + att.q_lora_rank * h * qk
            q += att.q_lora_rank if att.qkv_bias else 0
        kv_a = d * (att.kv_lora_rank + att.qk_rope_head_dim)
        kv_a += att.kv_lora_rank + att.qk_rope_head_dim if att.qkv_bias else 0
        kv_b = att.kv_lora_rank * h * (att.qk_nope_head_dim + att.v_head_dim)
        o = h * att.v_head_dim * d + (d if att.o_bias else 0)
        return q + kv_a + kv_b + o + (h if att.sinks else 0)
    q_width, kv_width = h * att.head_dim, att.n_kv_heads * att.head_dim
    weights = 2 * d * q_width + 2 * d * kv_width
    biases = (q_width + 2 * kv_width if att.qkv_bias else 0) + (d if att.o_bias else 0)
    return weights + biases + (h if att.sinks else 0)


def attention_norm_params(att: AttentionSpec, d_model: int) -> int:
    """Norm vectors inside an attention block.

    - qk_norm="head" (Qwen3): one d_h vector each for q and k, shared by heads: 2 d_h.
    - qk_norm="full" (OLMoE, moelab): one norm over all query heads, H d_h, and
      one over all key heads, G d_h (OLMoE writes these as hidden_size and
      (hidden_size / H) G, the same numbers whenever its forward pass runs).
    - MLA: RMSNorm on the query latent (r_q, when present) and on the KV latent (r_kv).
    """
    n = 0
    if att.qk_norm == "head":
        n += 2 * att.head_dim
    elif att.qk_norm == "full":
        n += (att.n_heads + att.n_kv_heads) * att.head_dim
    if att.kind == "mla":
        n += (att.q_lora_rank or 0) + att.kv_lora_rank
    return n


def mlp_params(mlp: MLPSpec, d_model: int) -> int:
    """One MLP: gated (SwiGLU) has gate and up D x F and down F x D, so 3 D F;
    a plain MLP has 2 D F. Biases add F per input projection and D on down."""
    n_in = 2 if mlp.gated else 1
    weights = (n_in + 1) * d_model * mlp.d_ff
    biases = n_in * mlp.d_ff + d_model if mlp.bias else 0
    return weights + biases


def router_params(moe: MoESpec, d_model: int) -> int:
    """The router is a D x E linear map (+ E biases in gpt-oss); a sigmoid gate
    on the shared expert (Qwen2-MoE) adds a D x 1 map, and noisy top-k gating
    (Shazeer et al. 2017) a second D x E map for the noise scale. DeepSeek-V3's
    `e_score_correction_bias` is a buffer, not a parameter, so it is not counted."""
    n = d_model * moe.num_experts * (2 if moe.router_noise else 1)
    n += moe.num_experts if moe.router_bias else 0
    return n + (d_model if moe.shared_gate else 0)


@dataclass(frozen=True, kw_only=True)
class MoELayerGroup:
    """Consecutive-or-not MoE layers with identical shapes, for per-layer tables."""

    layers: tuple[int, ...]
    num_experts: int
    top_k: int
    num_shared: int
    params_per_expert: int
    shared_params: int
    router_params: int

    @property
    def skipped(self) -> int:
        return self.num_experts - self.top_k

    @property
    def ffn_compute_saved(self) -> float:
        """Share of this layer's FFN FLOPs saved versus running every routed expert
        (shared experts run either way): (E - K) p_e / (E p_e + p_shared)."""
        everything = self.num_experts * self.params_per_expert + self.shared_params
        return self.skipped * self.params_per_expert / everything if everything else 0.0


@dataclass(frozen=True, kw_only=True)
class ParamCount:
    """Parameters by component; `other` holds always-active parameters that an
    `ExplicitSpec` does not break down further."""

    embedding: int
    lm_head: int
    attention: int
    norms: int
    dense_ffn: int
    shared_experts: int
    router: int
    routed_experts: int
    routed_active: int
    other: int = 0
    moe_groups: tuple[MoELayerGroup, ...] = ()

    @property
    def total(self) -> int:
        return (
            self.embedding + self.lm_head + self.attention + self.norms + self.dense_ffn
            + self.shared_experts + self.router + self.routed_experts + self.other
        )

    @property
    def active(self) -> int:
        return self.total - self.routed_experts + self.routed_active

    @property
    def total_no_embed(self) -> int:
        return self.total - self.embedding - self.lm_head

    @property
    def active_no_embed(self) -> int:
        return self.active - self.embedding - self.lm_head

    @property
    def matmul_active(self) -> int:
        """Active parameters that take part in a matmul: all active parameters but
        the input embedding (a lookup) and norm vectors. Biases and sinks are kept:
        they cost about one FLOP each, far below 0.01% of the total."""
        return self.active - self.embedding - self.norms


def embedding_params(spec: ArchSpec) -> int:
    """The input embedding table: V x D."""
    return spec.vocab_size * spec.d_model


def lm_head_params(spec: ArchSpec) -> int:
    """The output projection D x V, zero when tied to the embedding (the matrix is
    counted once, as the embedding), plus V when it has a bias (PhiMoE)."""
    weight = 0 if spec.tie_embeddings else spec.d_model * spec.vocab_size
    return weight + (spec.vocab_size if spec.lm_head_bias else 0)


def norm_params(spec: ArchSpec) -> int:
    """Layer norms: (norms_per_layer L + final) vectors of width D, doubled for
    LayerNorm with bias, plus the norms inside attention blocks."""
    per_vector = spec.d_model * (2 if spec.norm == "layernorm" else 1)
    n_vectors = spec.norms_per_layer * spec.n_layers + (1 if spec.final_norm else 0)
    inner = sum(attention_norm_params(layer.attention, spec.d_model) for layer in spec.layers)
    return n_vectors * per_vector + inner


def _group_moe_layers(spec: ArchSpec) -> tuple[MoELayerGroup, ...]:
    groups: dict[tuple, list[int]] = {}
    for i, layer in enumerate(spec.layers):
        moe = layer.ffn
        if isinstance(moe, MoESpec):
            key = (
                moe.num_experts,
                moe.top_k,
                moe.num_shared,
                mlp_params(moe.expert, spec.d_model),
                mlp_params(moe.shared, spec.d_model) if moe.shared else 0,
                router_params(moe, spec.d_model),
            )
            groups.setdefault(key, []).append(i)
    return tuple(
        MoELayerGroup(
            layers=tuple(idx),
            num_experts=k[0],
            top_k=k[1],
            num_shared=k[2],
            params_per_expert=k[3],
            shared_params=k[4],
            router_params=k[5],
        )
        for k, idx in groups.items()
    )


def _count_explicit(spec: ExplicitSpec) -> ParamCount:
    # The textbook picture: an "expert" is a whole network spanning every layer,
    # so the one group covers all layers and params_per_expert is the full 7B.
    group = MoELayerGroup(
        layers=tuple(range(spec.n_layers)),
        num_experts=spec.num_experts,
        top_k=spec.top_k,
        num_shared=0,
        params_per_expert=spec.expert_params,
        shared_params=0,
        router_params=0,
    )
    return ParamCount(
        embedding=spec.embedding_params,
        lm_head=spec.lm_head_params,
        attention=0,
        norms=0,
        dense_ffn=0,
        shared_experts=0,
        router=0,
        routed_experts=spec.num_experts * spec.expert_params,
        routed_active=spec.top_k * spec.expert_params,
        other=spec.shared_params - spec.embedding_params - spec.lm_head_params,
        moe_groups=(group,),
    )


def count_params(spec: Spec) -> ParamCount:
    """Count every parameter of `spec`, by component (see module docstring).

    Per layer: attention_params + (mlp_params for a dense FFN, or, for MoE,
    E mlp_params(expert) routed + mlp_params(shared) + router_params); active
    routed parameters are K mlp_params(expert) per MoE layer.
    """
    if isinstance(spec, ExplicitSpec):
        return _count_explicit(spec)
    d = spec.d_model
    attention = dense = shared = router = routed = routed_active = 0
    for layer in spec.layers:
        attention += attention_params(layer.attention, d)
        ffn = layer.ffn
        if isinstance(ffn, MoESpec):
            per_expert = mlp_params(ffn.expert, d)
            routed += ffn.num_experts * per_expert
            routed_active += ffn.top_k * per_expert
            shared += mlp_params(ffn.shared, d) if ffn.shared else 0
            router += router_params(ffn, d)
        else:
            dense += mlp_params(ffn, d)
    return ParamCount(
        embedding=embedding_params(spec),
        lm_head=lm_head_params(spec),
        attention=attention,
        norms=norm_params(spec),
        dense_ffn=dense,
        shared_experts=shared,
        router=router,
        routed_experts=routed,
        routed_active=routed_active,
        moe_groups=_group_moe_layers(spec),
    )
