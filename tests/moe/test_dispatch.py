"""`LocalDispatcher`: rows grouped by expert in expert order, capacity and drops, combine
back to tokens; checked against a naive per-assignment computation, values and gradients."""

from __future__ import annotations

import pytest
import torch

from moelab.moe import LocalDispatcher, MoEConfig, Router, dispatch


def _route(T, E, K, **kw):
    torch.manual_seed(T * 100 + E)
    cfg = MoEConfig(d_model=8, d_expert=4, num_experts=E, top_k=K, **kw)
    router = Router(cfg).double()
    router.reset_parameters(std=0.5)
    x = torch.randn(T, 8, dtype=torch.float64)
    return cfg, x, router(x)


@pytest.mark.parametrize(("T", "E", "K"), [(1, 4, 2), (7, 8, 2), (33, 6, 3), (5, 16, 4)])
def test_rows_are_grouped_by_expert(T, E, K):
    cfg, x, route = _route(T, E, K)
    d = LocalDispatcher(E, K, None, "probability").dispatch(x, route)
    counts = d.tokens_per_expert_E.tolist()
    assert sum(counts) == T * K == d.x_AD.shape[0] and d.dropped is None
    assert counts == torch.bincount(route.expert_idx_TK.reshape(-1), minlength=E).tolist()
    start = 0
    for e, n in enumerate(counts):  # expert e's rows: its tokens, in token order, with their weights
        tokens = d.token_idx_A[start : start + n].tolist()
        assert tokens == sorted(tokens)
        for a, t in enumerate(tokens, start):
            k = route.expert_idx_TK[t].tolist().index(e)
            assert torch.equal(d.x_AD[a], x[t])
            assert d.weight_A[a] == route.weights_TK[t, k]
        start += n


@pytest.mark.parametrize("kw", [dict(), dict(capacity_factor=0.5), dict(capacity_factor=0.5, drop_policy="position"),
                                dict(router="expert_choice", causal=False, capacity_factor=1.0)])
def test_dispatch_combine_equals_naive_sum(kw):
    """With y_A = w_A * f(x_A) for a fixed nonlinear f, combine gives sum_k w_tk f(x_t) over
    the kept assignments, and the same gradients wrt x and the router weights."""
    T, E, K = 24, 6, 2
    cfg, x, _ = _route(T, E, K, **kw)
    torch.manual_seed(1)
    router = Router(cfg).double()
    router.reset_parameters(std=0.5)
    disp = LocalDispatcher(E, K, cfg.capacity_factor, cfg.drop_policy)
    scale_E = torch.linspace(0.5, 2.0, E, dtype=torch.float64)

    def fast(x):
        route = router(x)
        d = disp.dispatch(x, route)
        expert_A = torch.repeat_interleave(torch.arange(E), d.tokens_per_expert_E)
        y_AD = torch.tanh(d.x_AD * scale_E[expert_A, None]) * d.weight_A[:, None]
        return disp.combine(y_AD, d), d

    def naive(x):
        route = router(x)
        out = torch.zeros_like(x)
        if route.is_expert_choice:
            for e in range(E):
                for c in range(route.token_idx_EC.shape[1]):
                    t = int(route.token_idx_EC[e, c])
                    out = out.index_add(0, torch.tensor([t]), (torch.tanh(x[t] * scale_E[e]) * route.weights_EC[e, c])[None])
            return out
        d = disp.dispatch(x, route)  # only for the keep mask
        keep = d.keep_TK if d.keep_TK is not None else torch.ones_like(route.expert_idx_TK, dtype=torch.bool)
        for t in range(T):
            for k in range(K):
                if keep[t, k]:
                    e = int(route.expert_idx_TK[t, k])
                    out = out.index_add(0, torch.tensor([t]), (torch.tanh(x[t] * scale_E[e]) * route.weights_TK[t, k])[None])
        return out

    xf, xn = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    got, d = fast(xf)
    want = naive(xn)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if cfg.capacity_factor is not None and cfg.router != "expert_choice":
        assert int(d.dropped) > 0 and d.x_AD.shape[0] == T * K - int(d.dropped)
    g = torch.randn_like(x)
    (got * g).sum().backward()
    gw_fast = router.weight.grad.clone()
    router.weight.grad = None
    (want * g).sum().backward()
    torch.testing.assert_close(xf.grad, xn.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw_fast, router.weight.grad, rtol=1e-10, atol=1e-12)


def test_gather_and_combine_pass_gradcheck():
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([4, 0, 0, 2, 4, 1])
    assert torch.autograd.gradcheck(lambda x: dispatch._Gather.apply(x, idx), (x,))
    y = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y: dispatch._Combine.apply(y, idx, 5), (y,))


def test_counts_by_comparison_equal_bincount(monkeypatch):
    """Inside a compiled graph the counts come from a comparison (static shape)."""
    expert_A = torch.tensor([3, 0, 3, 5, 1, 3])
    eager = dispatch.count_per_expert(expert_A, 7)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert torch.equal(dispatch.count_per_expert(expert_A, 7), eager)
    assert eager.tolist() == [1, 1, 0, 3, 0, 1, 0]
