"""Forward and training FLOPs per token.

Convention: a multiply-add is 2 FLOPs. Forward FLOPs per token are

    F_fwd = 2 N_matmul + F_attn(context),

where N_matmul is every *active* parameter that takes part in a matmul (routed
experts the token uses, shared experts, router, attention projections, dense
FFNs and the LM head; not the input-embedding lookup, not norm vectors), and
F_attn is the attention-score work that does not involve parameters: Q K^T and
A V. Training FLOPs are F_train = 3 F_fwd (the backward pass costs two forward
passes: gradients with respect to activations and to weights), the 6N rule of
Kaplan et al. (2020) with attention included.
"""

from __future__ import annotations

from moelab.accounting.params import ParamCount
from moelab.accounting.spec import ArchSpec, AttentionSpec, Spec


def mean_attended_keys(context: int, window: int | None = None) -> float:
    """Keys a query attends to, averaged over the positions of one causal sequence.

    Position t (1-based) of a sequence of length L attends to min(t, w) keys, so
    the mean is (1/L) sum_t min(t, w): (L + 1) / 2 without a window (the causal
    average, about L/2), and (w (w + 1) / 2 + (L - w) w) / L when L > w.
    """
    if context <= 0:
        return 0.0
    if window is None or window >= context:
        return (context + 1) / 2
    return (window * (window + 1) / 2 + (context - window) * window) / context


def attention_score_flops(att: AttentionSpec, context: int) -> float:
    """Per token and layer: Q K^T costs 2 H d_qk and A V costs 2 H d_v per attended
    key. MLA is counted in its naive (decompressed) form, d_qk = d_nope + d_rope;
    the absorbed-weight inference trick changes this term, not the parameters."""
    per_key = 2 * att.n_heads * (att.qk_head_dim + att.value_head_dim)
    return per_key * mean_attended_keys(context, att.window)


def attention_flops_per_token(spec: Spec, context: int) -> float:
    """Attention-score FLOPs per token summed over layers, at the causal average
    over a sequence of `context` tokens (see `mean_attended_keys`)."""
    if isinstance(spec, ArchSpec):
        return sum(attention_score_flops(layer.attention, context) for layer in spec.layers)
    if spec.attention is None:
        return 0.0
    return spec.n_layers * attention_score_flops(spec.attention, context)


def forward_flops_per_token(spec: Spec, counts: ParamCount, context: int) -> float:
    """F_fwd = 2 N_matmul + F_attn(context) (module docstring)."""
    return 2 * counts.matmul_active + attention_flops_per_token(spec, context)


def training_flops_per_token(spec: Spec, counts: ParamCount, context: int) -> float:
    """F_train = 3 F_fwd: forward, plus backward at twice the forward cost."""
    return 3 * forward_flops_per_token(spec, counts, context)
