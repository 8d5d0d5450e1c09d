"""The MoE branch taken under `torch.compile` at inference (`experts_in_graph`: traced
sorting around one opaque op for the grouped GEMMs, `moelab::grouped_expert_ffn`, or at
one token `moelab::one_token_expert_ffn`). Same output as the loop reference; valid
custom ops (fake tensor impl, schema); the finiteness check still raises.
"""

from __future__ import annotations

import pytest
import torch

from moelab.moe import MoEConfig, experts, layer
from moelab.moe.layer import NonFiniteRouterError, grouped_expert_ffn, one_token_expert_ffn


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["mm_loop", "grouped_mm"])
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("cfg_kw", [
    dict(num_experts=4, top_k=2),
    dict(num_experts=6, top_k=3, activation="gelu"),
    dict(num_experts=4, top_k=2, num_shared_experts=1, shared_expert_gate=True),
    dict(num_experts=8, top_k=2, router="sigmoid", n_group=2, topk_group=1),
])
def test_compiled_inference_branch_equals_reference(make_pair, monkeypatch, T, cfg_kw, dtype):
    """`MoE.forward` as it runs inside a compiled graph (that branch forced), eagerly. One
    token takes the GEMV op; more take the grouped op, where float64 runs the per-expert
    mm loop and float32 `torch._grouped_mm`."""
    if dtype == torch.float32 and T > 1 and not experts.GROUPED_MM:
        pytest.skip("this torch has no torch._grouped_mm")
    fast, ref = make_pair(MoEConfig(d_model=16, d_expert=8, **cfg_kw))
    fast, ref = fast.to(dtype), ref.to(dtype)
    x = torch.randn(T, 16, dtype=dtype, generator=torch.Generator().manual_seed(T))
    calls, grouped = [], []
    use_grouped_mm = experts._use_grouped_mm
    monkeypatch.setattr(layer, "_compiled_inference", lambda cfg: True)
    for name in ("grouped_expert_ffn", "one_token_expert_ffn"):
        op = getattr(torch.ops.moelab, name).default
        monkeypatch.setattr(layer, name, lambda *a, name=name, op=op: calls.append(name) or op(*a))
    monkeypatch.setattr(experts, "_use_grouped_mm", lambda *a: grouped.append(use_grouped_mm(*a)) or grouped[-1])
    with torch.no_grad():
        got = fast(x, telemetry=False).output
    monkeypatch.undo()
    with torch.no_grad():
        want = ref(x, telemetry=False).output
    if T == 1:
        assert calls == ["one_token_expert_ffn"]
    else:
        assert calls == ["grouped_expert_ffn"]
        assert grouped and set(grouped) == {dtype == torch.float32}
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("T", [1, 4])
def test_op_passes_opcheck(make_pair, T):
    fast, _ = make_pair(MoEConfig(d_model=16, d_expert=8, num_experts=4, top_k=2))
    x_AD = torch.randn(2 * T, 16, dtype=torch.float64)
    offsets_E = torch.tensor([0, T, T, 2 * T], dtype=torch.int32)  # experts 1 and 3, T rows each
    args = (x_AD, fast.experts.w_in.detach(), fast.experts.down_proj.detach(), torch.rand(2 * T, dtype=torch.float64),
            offsets_E, None, "swiglu")
    torch.library.opcheck(torch.ops.moelab.grouped_expert_ffn.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_one_token_op_passes_opcheck(make_pair):
    fast, _ = make_pair(MoEConfig(d_model=16, d_expert=8, num_experts=4, top_k=2))
    args = (torch.randn(1, 16, dtype=torch.float64), fast.experts.w_in.detach(), fast.experts.down_proj.detach(),
            torch.tensor([3, 1]), torch.tensor([0.7, 0.3], dtype=torch.float64), None, "swiglu")
    torch.library.opcheck(torch.ops.moelab.one_token_expert_ffn.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_op_raises_on_non_finite_router_logits():
    x_AD = torch.randn(2, 4)
    w_in, w_out = torch.randn(3, 8, 4), torch.randn(3, 4, 4)
    weight_A, offsets_E = torch.ones(2), torch.tensor([1, 1, 2], dtype=torch.int32)
    logits = torch.tensor([[0.0, float("nan"), 1.0], [0.0, 0.0, 0.0]])
    with pytest.raises(NonFiniteRouterError, match="NaN/Inf"):
        grouped_expert_ffn(x_AD, w_in, w_out, weight_A, offsets_E, logits, "swiglu")
    out = grouped_expert_ffn(x_AD, w_in, w_out, weight_A, offsets_E, None, "swiglu")  # unchecked
    assert out.shape == x_AD.shape
    with pytest.raises(NonFiniteRouterError, match="NaN/Inf"):
        one_token_expert_ffn(x_AD[:1], w_in, w_out, torch.tensor([0, 2]), weight_A, logits[:1], "swiglu")
