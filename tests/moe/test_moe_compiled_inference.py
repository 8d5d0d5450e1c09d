"""The MoE layer as it runs inside a graph compiled for inference (``generate(compile=True)``):
routing, sort, gather and scatter traced, the expert GEMMs one opaque op
(`moelab::segmented_expert_ffn`), the finiteness check an assert compiled into the graph.
Same output as the loop reference; a valid custom op (fake tensor impl, schema); the
finiteness check still raises, in a real compiled graph.
"""

from __future__ import annotations

import pytest
import torch

from moelab.moe import MoEConfig, cpu_kernels, ops, traced


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["mm_loop", "grouped_mm"])
@pytest.mark.parametrize("T", [1, 5, 40])
@pytest.mark.parametrize("cfg_kw", [
    dict(num_experts=4, top_k=2),
    dict(num_experts=6, top_k=3, activation="gelu"),
    dict(num_experts=4, top_k=2, num_shared_experts=1, shared_expert_gate=True),
    dict(num_experts=8, top_k=2, router="sigmoid", n_group=2, topk_group=1),
])
def test_compiled_inference_branch_equals_reference(make_pair, monkeypatch, T, cfg_kw, dtype):
    """`MoE.forward` with `torch.compiler.is_compiling()` forced True (outside the ops'
    bodies, which run eagerly in a real graph too), under no_grad. Up to
    `traced.TRACED_MAX_ROWS` rows take the traced rows (`traced.expert_rows`, no op); more
    take the op's chunks, where float64 runs the per-expert mm loop and float32
    `torch._grouped_mm`."""
    if dtype == torch.float32 and T > 1 and not cpu_kernels.GROUPED_MM:
        pytest.skip("this torch has no torch._grouped_mm")
    fast, ref = make_pair(MoEConfig(d_model=16, d_expert=8, **cfg_kw))
    fast, ref = fast.to(dtype), ref.to(dtype)
    x = torch.randn(T, 16, dtype=dtype, generator=torch.Generator().manual_seed(T))
    calls, grouped, gemv, inside_op = [], [], [], []
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: not inside_op)
    for name in ("segmented_expert_ffn",):
        op = getattr(torch.ops.moelab, name).default

        def run(*a, name=name, op=op):
            calls.append(name)
            inside_op.append(True)
            try:
                return op(*a)
            finally:
                inside_op.pop()

        monkeypatch.setattr(ops, name, run)
    use_grouped_mm, one_row_each = cpu_kernels.use_grouped_mm, cpu_kernels._one_row_each
    monkeypatch.setattr(cpu_kernels, "use_grouped_mm", lambda *a: grouped.append(use_grouped_mm(*a)) or grouped[-1])
    monkeypatch.setattr(cpu_kernels, "_one_row_each", lambda *a: gemv.append(1) or one_row_each(*a))
    with torch.no_grad():
        got = fast(x, telemetry=False).output
    monkeypatch.undo()
    with torch.no_grad():
        want = ref(x, telemetry=False).output
    if T * cfg_kw["top_k"] <= traced.TRACED_MAX_ROWS:
        assert calls == [] and not gemv and not grouped
    else:
        assert calls == ["segmented_expert_ffn"]
        assert not gemv and grouped and set(grouped) == {dtype == torch.float32}
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("T", [1, 4])
def test_op_passes_opcheck(make_pair, T):
    fast, _ = make_pair(MoEConfig(d_model=16, d_expert=8, num_experts=4, top_k=2))
    x_AD = torch.randn(2 * T, 16, dtype=torch.float64)
    counts_E = torch.tensor([0, T, 0, T])  # experts 1 and 3, T rows each
    args = (x_AD, fast.experts.w_in.detach(), fast.experts.down_proj.detach(), torch.rand(2 * T, dtype=torch.float64),
            counts_E, "swiglu")
    torch.library.opcheck(torch.ops.moelab.segmented_expert_ffn.default, args,
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("A", [1, 2, 3, 8])
def test_order_of_distinct_is_argsort(A):
    g = torch.Generator().manual_seed(A)
    expert_A = torch.randperm(16, generator=g)[:A]
    assert torch.equal(traced.order_of_distinct(expert_A), torch.argsort(expert_A))


@pytest.mark.slow
def test_compiled_graph_raises_on_non_finite_router_logits(make_pair):
    """A real compiled graph: the assert fires with the error's message (RuntimeError, as
    inductor raises it; `generate`'s compiled step turns it into `NonFiniteRouterError`,
    tests/infer), and finite input passes through it."""
    fast, ref = make_pair(MoEConfig(d_model=16, d_expert=8, num_experts=4, top_k=2))
    run = torch.compile(lambda x: fast(x, telemetry=False).output, fullgraph=True, dynamic=False)
    x = torch.randn(1, 16, dtype=fast.experts.down_proj.dtype)
    with torch.no_grad():
        torch.testing.assert_close(run(x), ref(x, telemetry=False).output)
        with pytest.raises(RuntimeError, match="router logits contain NaN/Inf"):
            run(torch.full_like(x, float("nan")))
