"""The MoE branch taken under `torch.compile` at inference: the routed experts as one
opaque op (`moelab::routed_experts_inference`). Same output as the loop reference; a
valid custom op (fake tensor impl, schema); the finiteness check still raises.
"""

from __future__ import annotations

import pytest
import torch

from moelab.moe import MoEConfig, dispatch
from moelab.moe.layer import NonFiniteRouterError, routed_experts_inference


@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("cfg_kw", [
    dict(num_experts=4, top_k=2),
    dict(num_experts=6, top_k=3, activation="gelu"),
    dict(num_experts=4, top_k=2, num_shared_experts=1, shared_expert_gate=True),
    dict(num_experts=8, top_k=2, router="sigmoid", n_group=2, topk_group=1),
])
def test_compiled_inference_branch_equals_reference(make_pair, monkeypatch, T, cfg_kw):
    """`MoE.forward` as it runs inside a compiled graph (made to believe it is compiling)."""
    fast, ref = make_pair(MoEConfig(d_model=16, d_expert=8, **cfg_kw))
    x = torch.randn(T, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(T))
    calls = []
    op = torch.ops.moelab.routed_experts_inference.default
    monkeypatch.setattr("moelab.moe.layer.routed_experts_inference", lambda *a: calls.append(1) or op(*a))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.no_grad():
        got = fast(x, telemetry=False).output
    monkeypatch.undo()
    with torch.no_grad():
        want = ref(x, telemetry=False).output
    assert calls == [1]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("T", [1, 4])
def test_op_passes_opcheck(make_pair, T):
    fast, _ = make_pair(MoEConfig(d_model=16, d_expert=8, num_experts=4, top_k=2))
    x = torch.randn(T, 16, dtype=torch.float64)
    weights, idx, _ = fast._token_choice(fast.router.logits(x).detach())
    token_A, expert_A, weight_A = dispatch.assignments_token_choice(idx, weights)
    args = (x, fast.experts.w_in.detach(), fast.experts.down_proj.detach(), token_A, expert_A, weight_A, None, "swiglu")
    torch.library.opcheck(torch.ops.moelab.routed_experts_inference.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_op_raises_on_non_finite_router_logits():
    x = torch.randn(2, 4)
    w_in, w_out = torch.randn(3, 8, 4), torch.randn(3, 4, 4)
    token_A, expert_A, weight_A = torch.tensor([0, 1]), torch.tensor([0, 2]), torch.ones(2)
    logits = torch.tensor([[0.0, float("nan"), 1.0], [0.0, 0.0, 0.0]])
    with pytest.raises(NonFiniteRouterError, match="NaN/Inf"):
        routed_experts_inference(x, w_in, w_out, token_A, expert_A, weight_A, logits, "swiglu")
    out = routed_experts_inference(x, w_in, w_out, token_A, expert_A, weight_A, None, "swiglu")  # unchecked
    assert out.shape == x.shape
