"""The fast path (`impl="grouped"`) equals the per-expert loop reference, outputs and gradients.

Everything runs in float64, so the two paths agree to ~1e-12 and any real difference
(a wrong slice, a missed expert, a wrong gradient term) shows up far above that.
"""

from __future__ import annotations

import pytest
import torch

from moelab.moe import LocalDispatcher, MoEConfig, cpu_kernels


@pytest.fixture(
    autouse=True,
    params=[(0, 16384), (300, 64), (1 << 40, 16384)],
    ids=["chunk_per_expert", "chunk_mixed_gather_pieces", "one_chunk"],
)
def chunking(request, monkeypatch):
    """Run every comparison with each way the fast path can cut rows into chunks (and,
    with a tiny serial threshold, with gathers/scatters split into row pieces)."""
    chunk_bytes, serial_elems = request.param
    monkeypatch.setattr(cpu_kernels, "CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(cpu_kernels, "_SERIAL_ELEMS", serial_elems)
    return request.param


@pytest.fixture(autouse=True, params=["fused", "unfused"])
def dispatch_path(request, monkeypatch):
    """Run every comparison through the local dispatcher's fused path (gather and combine
    inside the segmented kernel) and through the protocol's unfused one (materialised
    ``x_AD``, the experts backend, then `combine`), which an expert-parallel dispatcher uses."""
    if request.param == "unfused":
        def unfused(self, experts, d):
            return self.combine(experts(d.x_AD, d.tokens_per_expert_E, d.weight_A), d)

        monkeypatch.setattr(LocalDispatcher, "run_experts", unfused)
    return request.param


# (T, D, E, K): one token; fewer tokens than experts; one expert; fine-grained.
SHAPES = [(1, 8, 4, 2), (3, 8, 8, 2), (17, 16, 1, 1), (33, 16, 6, 3), (64, 32, 128, 8)]

ROUTERS = {
    "softmax_renorm": dict(router="softmax", norm_topk_prob=True),
    "softmax_raw": dict(router="softmax", norm_topk_prob=False, routed_scaling_factor=1.7),
    "sigmoid_bias_groups": dict(
        router="sigmoid", n_group=2, topk_group=1, routed_scaling_factor=2.5
    ),
    "switch": dict(router="switch"),
    "expert_choice": dict(router="expert_choice", causal=False),
}


def _router_cases():
    for T, D, E, K in SHAPES:
        for name, kw in ROUTERS.items():
            k = 1 if name == "switch" else K
            if name == "sigmoid_bias_groups":
                if E % 2 or k > E // 2:  # group-limited routing needs whole groups and k <= E/2
                    kw = dict(router="sigmoid")
            yield pytest.param(T, D, E, k, kw, id=f"T{T}-D{D}-E{E}-K{k}-{name}")


def _assert_same(fast, ref, x: torch.Tensor, *, check_grads: bool = True) -> None:
    xf = x.clone().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    of, orf = fast(xf), ref(xr)
    torch.testing.assert_close(of.output, orf.output, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(of.aux_loss, orf.aux_loss)
    assert torch.equal(of.stats.tokens_per_expert, orf.stats.tokens_per_expert)
    if not check_grads:
        return
    g = torch.randn_like(of.output)
    (of.output * g).sum().backward()
    (orf.output * g).sum().backward()
    torch.testing.assert_close(xf.grad, xr.grad, rtol=1e-10, atol=1e-12)
    for (name, pf), (_, pr) in zip(fast.named_parameters(), ref.named_parameters(), strict=True):
        assert (pf.grad is None) == (pr.grad is None), name
        if pf.grad is not None:
            torch.testing.assert_close(pf.grad, pr.grad, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize(("T", "D", "E", "K", "router_kw"), list(_router_cases()))
def test_fast_equals_reference_across_shapes_and_routers(make_pair, T, D, E, K, router_kw):
    cfg = MoEConfig(d_model=D, d_expert=max(2, D // 2), num_experts=E, top_k=K, **router_kw)
    fast, ref = make_pair(cfg)
    x = torch.randn(T, D, dtype=torch.float64)
    _assert_same(fast, ref, x)


@pytest.mark.parametrize("capacity_factor", [0.25, 0.5, 1.0, 1.25, 4.0])
@pytest.mark.parametrize("drop_policy", ["probability", "position"])
@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_fast_equals_reference_with_capacity(make_pair, capacity_factor, drop_policy, router):
    cfg = MoEConfig(
        d_model=16,
        d_expert=8,
        num_experts=8,
        top_k=2,
        router=router,
        capacity_factor=capacity_factor,
        drop_policy=drop_policy,
    )
    fast, ref = make_pair(cfg)
    x = torch.randn(2, 20, 16, dtype=torch.float64)
    _assert_same(fast, ref, x)
    if capacity_factor < 1:
        assert int(fast(x).stats.dropped) > 0  # the case under test really drops


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 2.0])
def test_fast_equals_reference_expert_choice_capacity(make_pair, capacity_factor):
    cfg = MoEConfig(
        d_model=16,
        d_expert=8,
        num_experts=4,
        top_k=2,
        router="expert_choice",
        causal=False,
        capacity_factor=capacity_factor,
    )
    fast, ref = make_pair(cfg)
    _assert_same(fast, ref, torch.randn(3, 7, 16, dtype=torch.float64))


@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("num_shared", [1, 2])
def test_fast_equals_reference_with_shared_experts(make_pair, gate, num_shared):
    cfg = MoEConfig(
        d_model=16,
        d_expert=8,
        num_experts=6,
        top_k=2,
        num_shared_experts=num_shared,
        d_shared_expert=12,
        shared_expert_gate=gate,
    )
    fast, ref = make_pair(cfg)
    _assert_same(fast, ref, torch.randn(2, 9, 16, dtype=torch.float64))


@pytest.mark.parametrize(("T", "E", "K"), [(1, 4, 2), (25, 8, 2), (40, 32, 4)])
def test_fast_equals_reference_gelu(make_pair, T, E, K):
    cfg = MoEConfig(
        d_model=16, d_expert=24, num_experts=E, top_k=K, activation="gelu", num_shared_experts=1
    )
    fast, ref = make_pair(cfg)
    _assert_same(fast, ref, torch.randn(T, 16, dtype=torch.float64))


def test_fast_path_input_without_grad_and_frozen_weights(make_pair):
    """Backward skips gradients nobody asked for (needs_input_grad) and still matches."""
    cfg = MoEConfig(d_model=16, d_expert=8, num_experts=4, top_k=2)
    fast, ref = make_pair(cfg)
    for m in (fast, ref):
        m.experts.gate_up_proj.requires_grad_(False)
    x = torch.randn(11, 16, dtype=torch.float64)  # no grad wanted for the input
    g = torch.randn(11, 16, dtype=torch.float64)
    (fast(x).output * g).sum().backward()
    (ref(x).output * g).sum().backward()
    assert fast.experts.gate_up_proj.grad is None
    torch.testing.assert_close(fast.experts.down_proj.grad, ref.experts.down_proj.grad)
    torch.testing.assert_close(fast.router.weight.grad, ref.router.weight.grad)


def test_chunks_cover_every_row_once():
    counts = [3, 0, 5, 1, 0, 0, 7]
    for chunk_bytes in (0, 10, 40, 1 << 30):
        rows = []
        for b0, b1, segs in cpu_kernels.chunks_of(counts, row_bytes=8, chunk_bytes=chunk_bytes):
            assert segs[0][1] == 0 and segs[-1][2] == b1 - b0
            rows += [(e, b0 + r) for e, s, t in segs for r in range(s, t)]
        assert [r for _, r in rows] == list(range(sum(counts)))
        assert [e for e, _ in rows] == [e for e, n in enumerate(counts) for _ in range(n)]


def test_row_pieces_split_only_small_ops():
    row_elems = cpu_kernels._SERIAL_ELEMS // 8  # 8 rows per piece
    assert cpu_kernels._row_pieces(num_rows=5, row_elems=row_elems) is None  # one piece anyway
    pieces = cpu_kernels._row_pieces(num_rows=30, row_elems=row_elems)
    assert pieces is not None and pieces[0] == (0, 8) and pieces[-1] == (24, 30)
    assert cpu_kernels._row_pieces(num_rows=8 * cpu_kernels._MAX_PIECES + 1, row_elems=row_elems) is None
    assert cpu_kernels._row_pieces(num_rows=10**6, row_elems=row_elems) is None  # large: one call


def test_fast_path_saves_nothing_without_grad(make_pair):
    fast, _ = make_pair(MoEConfig(d_model=16, d_expert=8, num_experts=4, top_k=2))
    with torch.no_grad():
        out = fast(torch.randn(9, 16, dtype=torch.float64)).output
    assert out.grad_fn is None


def test_fast_path_under_no_grad_and_float32(make_pair):
    cfg = MoEConfig(d_model=32, d_expert=16, num_experts=8, top_k=2)
    fast, ref = make_pair(cfg)
    fast, ref = fast.float(), ref.float()
    x = torch.randn(50, 32)
    with torch.no_grad():
        torch.testing.assert_close(fast(x).output, ref(x).output, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("D", "E", "K", "router_kw"), [
    (8, 4, 2, dict(router="softmax")),
    (16, 8, 3, dict(router="softmax", norm_topk_prob=False)),
    (16, 8, 2, dict(router="sigmoid", routed_scaling_factor=2.5)),
    (16, 6, 1, dict(router="switch")),
    (16, 6, 2, dict(router="softmax", num_shared_experts=1, d_shared_expert=12, shared_expert_gate=True)),
    (16, 8, 2, dict(router="softmax", activation="gelu")),
    (16, 8, 2, dict(router="softmax", capacity_factor=0.25)),
])
def test_single_token_decode_path_equals_reference(make_pair, monkeypatch, D, E, K, router_kw):
    """Under no_grad a one-token call runs a GEMV pair per chosen expert
    (`cpu_kernels._one_row_each`, no chunking, no grouped GEMM): same output."""
    cfg = MoEConfig(d_model=D, d_expert=8, num_experts=E, top_k=K, **router_kw)
    fast, ref = make_pair(cfg)
    calls = []
    for name in ("_one_row_each", "_one_token"):  # unfused rows / fused: the token's GEMV pairs
        orig = getattr(cpu_kernels, name)
        monkeypatch.setattr(cpu_kernels, name, lambda *a, orig=orig: calls.append(1) or orig(*a))
    for seed in range(5):
        x = torch.randn(1, 1, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            torch.testing.assert_close(fast(x).output, ref(x).output, rtol=1e-10, atol=1e-12)
    assert len(calls) == 5  # the path under test was taken


@pytest.mark.parametrize("T", [1, 7])
def test_telemetry_off_changes_nothing_but_the_extras(make_pair, T):
    fast, _ = make_pair(MoEConfig(d_model=16, d_expert=8, num_experts=4, top_k=2, aux_loss_coef=0.1, z_loss_coef=0.1))
    x = torch.randn(T, 16, dtype=torch.float64)
    with torch.no_grad():
        full, lean = fast(x, return_routing=True), fast(x, return_routing=True, telemetry=False)
    torch.testing.assert_close(lean.output, full.output, rtol=0, atol=0)
    assert torch.equal(lean.routing.expert_idx, full.routing.expert_idx)
    assert lean.stats is None and float(lean.loss) == 0.0
    assert full.stats is not None and float(full.loss) > 0


@pytest.mark.skipif(not cpu_kernels.GROUPED_MM, reason="this torch has no torch._grouped_mm")
@pytest.mark.parametrize(("T", "E", "K", "activation"), [(16, 8, 2, "swiglu"), (9, 8, 3, "gelu"), (200, 16, 4, "swiglu")])
def test_grouped_mm_path_equals_mm_loop(make_pair, monkeypatch, T, E, K, activation):
    """float32 (the dtype `torch._grouped_mm` takes): same outputs and gradients with and without it."""
    cfg = MoEConfig(d_model=32, d_expert=16, num_experts=E, top_k=K, activation=activation)
    fast, _ = make_pair(cfg)
    fast = fast.float()
    x = torch.randn(T, 32)
    monkeypatch.setattr(cpu_kernels, "GROUPED_MM_MAX_ROWS", 1 << 30)  # every chunk, whatever its size
    used = []
    orig = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: used.append(1) or orig(*a, **k))
    results = {}
    for grouped in (True, False):
        monkeypatch.setattr(cpu_kernels, "GROUPED_MM", grouped)
        fast.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_(True)
        out = fast(xg).output
        (out * torch.linspace(-1, 1, 32)).sum().backward()
        with torch.no_grad():
            inference = fast(x).output
        results[grouped] = (out.detach(), inference, xg.grad, *(p.grad for p in fast.parameters()))
    assert used  # the grouped path really ran
    for a, b in zip(results[True], results[False], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
