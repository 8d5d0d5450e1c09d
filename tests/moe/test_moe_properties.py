"""Invariants of routing and dispatch that must hold for any input (hypothesis)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moelab.moe import MoE, MoEConfig, routing

FAST = settings(max_examples=25, deadline=None)


@st.composite
def token_choice_case(draw):
    E = draw(st.integers(1, 16))
    K = draw(st.integers(1, E))
    T = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**16))
    return T, E, K, seed


@FAST
@given(token_choice_case(), st.booleans())
def test_softmax_topk_distinct_experts_and_renormalised_weights(case, normalize):
    T, E, K, seed = case
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    w, idx, probs = routing.softmax_topk(logits, K, normalize=normalize)
    assert idx.shape == (T, K)
    assert all(len(set(row)) == K for row in idx.tolist())  # K distinct experts per token
    assert bool((idx >= 0).all() and (idx < E).all())
    torch.testing.assert_close(probs.sum(-1), torch.ones(T, dtype=torch.float64))
    if normalize:
        torch.testing.assert_close(w.sum(-1), torch.ones(T, dtype=torch.float64))
    else:
        assert bool((w.sum(-1) <= 1 + 1e-12).all())
    # routed_scaling_factor (DeepSeek-V2) multiplies the kept weights, and only them.
    w2, idx2, probs2 = routing.softmax_topk(logits, K, normalize=normalize, scaling_factor=2.5)
    assert torch.equal(idx2, idx) and torch.equal(probs2, probs)
    torch.testing.assert_close(w2, 2.5 * w)


@FAST
@given(token_choice_case(), st.sampled_from([1, 2, 4]))
def test_sigmoid_topk_distinct_experts_in_kept_groups(case, n_group):
    T, E, K, seed = case
    E = max(E, n_group) // n_group * n_group
    topk_group = max(1, n_group // 2)
    K = min(K, topk_group * (E // n_group))
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g, dtype=torch.float64)
    bias = 0.1 * torch.randn(E, generator=g, dtype=torch.float64)
    w, idx, _ = routing.sigmoid_topk(logits, K, bias_E=bias, n_group=n_group, topk_group=topk_group)
    assert all(len(set(row)) == K for row in idx.tolist())
    groups_used = (idx // (E // n_group)).tolist()
    assert all(len(set(row)) <= topk_group for row in groups_used)
    torch.testing.assert_close(w.sum(-1), torch.ones(T, dtype=torch.float64))


@FAST
@given(token_choice_case(), st.floats(0.1, 3.0), st.sampled_from(["probability", "position"]))
def test_capacity_is_never_exceeded_and_kept_plus_dropped_is_TK(case, factor, policy):
    T, E, K, seed = case
    torch.manual_seed(seed)
    cfg = MoEConfig(
        d_model=8, d_expert=4, num_experts=E, top_k=K, capacity_factor=factor, drop_policy=policy
    )
    layer = MoE(cfg)
    layer.reset_parameters(std=0.5)
    with torch.no_grad():
        out = layer(torch.randn(T, 8), return_routing=True)
    C = routing.expert_capacity(T, E, K, factor)
    tpe = out.stats.tokens_per_expert
    assert int(tpe.max()) <= C
    assert int(tpe.sum()) == T * K - int(out.stats.dropped)
    assert int(out.routing.kept.sum()) == int(tpe.sum())
    # Dropped slots carry zero weight in the reported decision.
    assert bool((out.routing.weights[~out.routing.kept] == 0).all())


@FAST
@given(token_choice_case())
def test_dropless_tokens_per_expert_sums_to_TK(case):
    T, E, K, seed = case
    torch.manual_seed(seed)
    layer = MoE(MoEConfig(d_model=8, d_expert=4, num_experts=E, top_k=K))
    with torch.no_grad():
        out = layer(torch.randn(T, 8))
    assert int(out.stats.dropped) == 0
    assert int(out.stats.tokens_per_expert.sum()) == T * K


@FAST
@given(token_choice_case(), st.floats(0.25, 2.0))
def test_expert_choice_every_expert_takes_exactly_C(case, factor):
    T, E, K, seed = case
    torch.manual_seed(seed)
    cfg = MoEConfig(
        d_model=8,
        d_expert=4,
        num_experts=E,
        top_k=K,
        router="expert_choice",
        causal=False,
        capacity_factor=factor,
    )
    with torch.no_grad():
        out = MoE(cfg)(torch.randn(T, 8))
    C = min(T, routing.expert_capacity(T, E, K, factor))
    assert out.stats.tokens_per_expert.tolist() == [C] * E
