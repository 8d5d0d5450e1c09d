"""Gradient checks: finite differences on the fast path, and the router's gradient path."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from moelab.moe import MoE, MoEConfig


def _tiny(**kw) -> MoE:
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=4, d_expert=3, num_experts=4, **{"top_k": 2, **kw})
    layer = MoE(cfg).double()
    layer.reset_parameters(std=0.5)  # large margins: finite differences never flip a top-k choice
    return layer


CASES = {
    "softmax_renorm": dict(),
    "gelu": dict(activation="gelu"),
    "capacity_drop": dict(capacity_factor=0.5),
    "sigmoid": dict(router="sigmoid", routed_scaling_factor=1.5),
    "expert_choice": dict(router="expert_choice", causal=False),
    "shared_gated": dict(num_shared_experts=1, shared_expert_gate=True),
}


@pytest.mark.parametrize("impl", ["grouped", "loop"])
@pytest.mark.parametrize("case", list(CASES))
def test_gradcheck_wrt_input(case, impl):
    layer = _tiny(impl=impl, **CASES[case])
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: layer(x).output, (x,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", ["softmax_renorm", "gelu", "sigmoid", "expert_choice"])
def test_gradcheck_wrt_router_and_expert_weights(case):
    """All parameters as gradcheck inputs via `functional_call`: checks the hand-written
    backward of the fused expert FFN (dW_in, dW_out, combine-weight -> router)."""
    layer = _tiny(**CASES[case])
    x = torch.randn(6, 4, dtype=torch.float64)
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for _, p in layer.named_parameters())

    def f(*ps):
        return functional_call(layer, dict(zip(names, ps, strict=True)), (x,)).output

    # fast_mode: checks random projections of the Jacobian (one backward per input tensor
    # rather than per element), enough to catch a wrong term in any weight gradient.
    assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("impl", ["grouped", "loop"])
@pytest.mark.parametrize(
    "kw",
    [
        dict(router="softmax", top_k=2, norm_topk_prob=True),
        dict(router="switch", top_k=1),
        dict(router="sigmoid", top_k=2),
    ],
    ids=["softmax_renorm_k2", "switch", "sigmoid"],
)
def test_router_gets_gradient_through_combine_weights_without_aux_loss(kw, impl):
    torch.manual_seed(0)
    layer = MoE(
        MoEConfig(d_model=8, d_expert=4, num_experts=4, aux_loss_coef=0.0, impl=impl, **kw)
    ).double()
    out = layer(torch.randn(10, 8, dtype=torch.float64))
    assert float(out.loss.detach()) == 0.0
    out.output.square().sum().backward()  # task loss only, no aux/z term
    grad = layer.router.weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0


def test_single_expert_renormalised_router_gets_no_output_gradient():
    """The flip side: with K=1 and renormalisation the weight is exactly 1, so only the aux
    loss can train the router (why Switch does not renormalise)."""
    layer = MoE(
        MoEConfig(d_model=8, d_expert=4, num_experts=4, top_k=1, aux_loss_coef=0.0)
    ).double()
    layer(torch.randn(10, 8, dtype=torch.float64)).output.square().sum().backward()
    # w / w is 1 up to rounding, so the gradient is zero up to rounding (~1e-24).
    assert float(layer.router.weight.grad.abs().max()) < 1e-12


def test_bf16_router_rounds_logits_through_a_bf16_product_and_trains():
    """``router_dtype="bfloat16"``: logits are the bf16 product, returned as float32, and
    the router still gets a gradient; float32 (default) stays the exact product."""
    torch.manual_seed(0)
    x_TD = torch.randn(64, 16)
    fp32 = MoE(MoEConfig(d_model=16, d_expert=8, num_experts=4, top_k=2))
    bf16 = MoE(MoEConfig(d_model=16, d_expert=8, num_experts=4, top_k=2, router_dtype="bfloat16"))
    bf16.load_state_dict(fp32.state_dict())
    w = fp32.router.weight
    torch.testing.assert_close(fp32.router.logits(x_TD), x_TD @ w.T)
    got = bf16.router.logits(x_TD)
    assert got.dtype == torch.float32
    assert torch.equal(got, torch.nn.functional.linear(x_TD.bfloat16(), w.bfloat16()).float())
    assert not torch.equal(got, fp32.router.logits(x_TD))
    bf16(x_TD.unsqueeze(0)).output.sum().backward()
    assert bf16.router.weight.grad is not None and bool(bf16.router.weight.grad.abs().sum() > 0)
