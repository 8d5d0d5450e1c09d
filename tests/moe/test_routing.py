"""The router owns routing: `Router.forward` = logits -> check -> `Router.select`, and
`select` applies each layer's rule exactly as the pure functions in `moe.routing` do."""

from __future__ import annotations

import pytest
import torch

from moelab.moe import MoEConfig, NonFiniteRouterError, Router, RouterOutput, routing

D, E = 16, 8


def _router(**kw) -> Router:
    torch.manual_seed(0)
    r = Router(MoEConfig(d_model=D, d_expert=8, num_experts=E, **kw)).double()
    r.reset_parameters(std=0.3)
    if kw.get("router") == "sigmoid":
        with torch.no_grad():
            r.expert_bias.normal_(0, 0.1)
    return r


@pytest.mark.parametrize("kw", [
    dict(router="softmax", top_k=2),
    dict(router="softmax", top_k=3, norm_topk_prob=False, routed_scaling_factor=1.5),
    dict(router="sigmoid", top_k=2, n_group=4, topk_group=2, routed_scaling_factor=2.5),
    dict(router="switch", top_k=1),
])
def test_select_is_the_layer_rule(kw):
    r = _router(**kw)
    logits = torch.randn(11, E, dtype=torch.float64)
    out = r.select(logits)
    assert isinstance(out, RouterOutput) and not out.is_expert_choice and out.num_tokens == 11
    cfg = r.cfg
    if cfg.router == "softmax":
        want = routing.softmax_topk(logits, cfg.top_k, normalize=cfg.norm_topk_prob,
                                    scaling_factor=cfg.routed_scaling_factor)
    elif cfg.router == "switch":
        want = routing.switch_top1(logits)
    else:
        want = routing.sigmoid_topk(logits, cfg.top_k, bias_E=r.expert_bias, n_group=cfg.n_group,
                                    topk_group=cfg.topk_group, scaling_factor=cfg.routed_scaling_factor)
    torch.testing.assert_close(out.weights_TK, want[0], rtol=0, atol=0)
    assert torch.equal(out.expert_idx_TK, want[1])
    torch.testing.assert_close(out.probs_TE, want[2], rtol=0, atol=0)
    assert out.expert_idx_TK.shape == (11, cfg.top_k)


def test_sigmoid_bias_steers_selection_not_weights():
    r = _router(router="sigmoid", top_k=2)
    logits = torch.zeros(4, E, dtype=torch.float64)
    with torch.no_grad():
        r.expert_bias.zero_()
        r.expert_bias[[3, 5]] = 1.0
    out = r.select(logits)
    assert sorted(out.expert_idx_TK[0].tolist()) == [3, 5]
    torch.testing.assert_close(out.weights_TK, torch.full((4, 2), 0.5, dtype=torch.float64))


def test_expert_choice_output():
    r = _router(router="expert_choice", causal=False, top_k=2, capacity_factor=1.0)
    logits = torch.randn(12, E, dtype=torch.float64)
    out = r.select(logits)
    C = routing.expert_capacity(12, E, 2, 1.0)
    assert out.is_expert_choice and out.token_idx_EC.shape == (E, C) and out.weights_EC.shape == (E, C)
    assert out.expert_idx_TK is None


def test_forward_is_logits_then_select():
    r = _router(router="softmax", top_k=2).eval()
    x = torch.randn(9, D, dtype=torch.float64)
    out = r(x)
    torch.testing.assert_close(out.logits_TE, x @ r.weight.t())
    assert torch.equal(out.expert_idx_TK, r.select(out.logits_TE).expert_idx_TK)


def test_jitter_and_noise_only_in_training():
    r = _router(router="softmax", top_k=2, jitter_eps=0.2, noisy_gating=True)
    with torch.no_grad():
        r.noise_weight.normal_(0, 0.5)
    x = torch.randn(32, D, dtype=torch.float64)
    r.eval()
    a, b = r(x), r(x)
    assert torch.equal(a.logits_TE, b.logits_TE)
    r.train()
    c = r(x)
    assert not torch.equal(a.logits_TE, c.logits_TE)


def test_non_finite_logits_raise_and_can_be_unchecked():
    r = _router(router="softmax", top_k=2)
    x = torch.randn(3, D, dtype=torch.float64)
    x[1, 0] = float("nan")
    with pytest.raises(NonFiniteRouterError, match=r"NaN/Inf.*input finite: False"):
        r(x)
    unchecked = _router(router="softmax", top_k=2, check_finite=False)
    assert not torch.isfinite(unchecked(x).logits_TE).all()


def test_bf16_router_rounds_the_product():
    r32, r16 = _router(router="softmax", top_k=2), _router(router="softmax", top_k=2, router_dtype="bfloat16")
    x = torch.randn(64, D, dtype=torch.float64)
    l32, l16 = r32.logits(x), r16.logits(x)
    assert l16.dtype == torch.float64
    want = torch.nn.functional.linear(x.bfloat16(), r16.weight.bfloat16()).double()
    assert torch.equal(l16, want) and not torch.equal(l16, l32)


@pytest.mark.parametrize("T,E,K,G,keep", [(7, 8, 2, 4, 2), (5, 12, 3, 3, 1), (9, 6, 4, 2, 2)])
def test_softmax_group_limited_matches_per_token_reference(T, E, K, G, keep):
    """DeepSeek-V2 group_limited_greedy: only experts of the `keep` groups with the largest
    max-probability compete; checked token by token against a plain loop."""
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(T), dtype=torch.float64)
    w, idx, probs = routing.softmax_topk(logits, K, normalize=False, scaling_factor=2.0, n_group=G, topk_group=keep)
    per = E // G
    for t in range(T):
        p = torch.softmax(logits[t], -1)
        groups = sorted(range(G), key=lambda g: -p[g * per : (g + 1) * per].max())[:keep]
        allowed = [e for g in groups for e in range(g * per, (g + 1) * per)]
        best = sorted(allowed, key=lambda e: -p[e])[:K]
        assert set(idx[t].tolist()) == set(best)
        assert torch.allclose(w[t], 2.0 * p[idx[t]])
    assert torch.allclose(probs, torch.softmax(logits, -1))


def test_softmax_selection_bias_steers_choice_not_weights():
    """ERNIE 4.5: the bias picks the experts, the weights stay the softmax probabilities."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]], dtype=torch.float64)
    bias = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    w, idx, probs = routing.softmax_topk(logits, 2, normalize=False, bias_E=bias)
    assert set(idx[0].tolist()) == {0, 3}
    assert torch.allclose(w[0], probs[0, idx[0]])
