"""`QuantizedExperts` against its float reference (`dequantized()`), through the MoE layer.

The kernels see bf16 activations, so the reference is fed the same bf16-rounded input
(routing is then identical) and run in float32 with the dequantised weights: the only
differences left are the kernel path's three bf16 roundings (the first GEMM's output, the
activation fed to the second, its output; ~2^-9 relative each), hence a tolerance of
1e-2 of the output's scale. Where int4 runs on moelab's int4 x int8 kernel
(`moelab.quant.vnni`), the GEMM inputs are also rounded to int8 per 32 inputs (half a step
of 1/127 of each block's largest): 2e-2 (its exact reference is tests/quant/test_vnni.py's).
The dequantise fallback runs in float32 throughout: 1e-5.
"""

from __future__ import annotations

import pytest
import torch

import moelab.quant.experts as qexperts
from moelab.errors import ConfigError
from moelab.infer.generate import generate
from moelab.model import ModelConfig, Transformer
from moelab.moe import MoE, MoEConfig, RoutedExperts
from moelab.quant import QuantFormat, QuantizedExperts, formats, quantize_model

D, F, E, K = 64, 32, 4, 2
FORMATS = {"int8": QuantFormat(name="int8"), "int4": QuantFormat(name="int4", group_size=32)}


def _layer(activation: str, seed: int = 0) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(MoEConfig(d_model=D, d_expert=F, num_experts=E, top_k=K, activation=activation)).eval()
    moe.reset_parameters(std=0.3)  # O(1) expert outputs, clear routing margins
    return moe


def _outputs(moe: MoE, experts_a, experts_b, x_TD: torch.Tensor):
    """(fused y_TD, unfused y_AD) of the same layer with two experts modules, same routing."""
    out = []
    with torch.no_grad():
        route = moe.router(x_TD)
        d = moe.dispatcher.dispatch(x_TD, route)
        for experts in (experts_a, experts_b):
            moe.experts = experts
            out.append((moe(x_TD, telemetry=False).output, experts(d.x_AD, d.tokens_per_expert_E, d.weight_A)))
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("T", [1, 7, 64, 600])  # 600 tokens: ~300 rows an expert, the bf16 GEMM path
@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_kernel_equals_dequantised_reference(activation, fmt, T):
    if not qexperts.kernel_runs(fmt):
        pytest.skip(f"the {fmt} kernel does not run in this torch build")
    moe = _layer(activation)
    q = QuantizedExperts.from_experts(moe.experts, FORMATS[fmt])
    x_TD = torch.randn(T, D).to(torch.bfloat16).float()  # what the kernel sees
    assert q.backend(x_TD).name == fmt
    (y_q, yA_q), (y_ref, yA_ref) = _outputs(moe, q, q.dequantized(), x_TD)
    assert y_q.dtype == torch.float32
    tol = 2e-2 if fmt == "int4" and qexperts.vnni_runs() else 1e-2
    assert _rel(y_q, y_ref) < tol and _rel(yA_q, yA_ref) < tol


@pytest.mark.parametrize("T", [1, 7, 64])
@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_fallback_equals_dequantised_reference(activation, fmt, T, monkeypatch):
    monkeypatch.setattr(qexperts, "kernel_runs", lambda name: False)
    moe = _layer(activation, seed=1)
    q = QuantizedExperts.from_experts(moe.experts, FORMATS[fmt])
    x_TD = torch.randn(T, D)
    assert q.backend(x_TD).name == "dequant"
    (y_q, yA_q), (y_ref, yA_ref) = _outputs(moe, q, q.dequantized(), x_TD)
    assert _rel(y_q, y_ref) < 1e-5 and _rel(yA_q, yA_ref) < 1e-5


def test_dequantized_is_close_to_the_float_experts():
    moe = _layer("swiglu")
    for fmt, tol in (("int8", 0.01), ("int4", 0.1)):  # 2^-8 and 2^-4 of each row/group's range
        ref = QuantizedExperts.from_experts(moe.experts, FORMATS[fmt]).dequantized()
        assert isinstance(ref, RoutedExperts)
        assert _rel(ref.w_in, moe.experts.w_in) < tol and _rel(ref.down_proj, moe.experts.down_proj) < tol


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_state_dict_round_trip(fmt):
    moe = _layer("swiglu")
    q = QuantizedExperts.from_experts(moe.experts, FORMATS[fmt])
    sd = q.state_dict()
    assert {k.rsplit("_", 1)[-1] for k in sd} >= {"qweight", "scale"}
    fresh = QuantizedExperts(D, F, E, "swiglu", FORMATS[fmt])
    x_TD = torch.randn(5, D)
    fresh.load_state_dict(sd)
    (y_a, _), (y_b, _) = _outputs(moe, q, fresh, x_TD)
    assert torch.equal(y_a, y_b)  # for int4 the kernel's packed copy was rebuilt after the load


def test_int4_under_inference_mode():
    """Built and run under `torch.inference_mode` (as in generation): no version counters."""
    moe = _layer("swiglu")
    with torch.inference_mode():
        q = QuantizedExperts.from_experts(moe.experts, FORMATS["int4"])
        x_TD = torch.randn(3, D).to(torch.bfloat16).float()
        (y_q, _), (y_ref, _) = _outputs(moe, q, q.dequantized(), x_TD)
    assert _rel(y_q, y_ref) < (2e-2 if qexperts.vnni_runs() else 1e-2)  # as in test_kernel_equals_...


def test_grad_is_refused():
    moe = _layer("swiglu")
    moe.experts = QuantizedExperts.from_experts(moe.experts, FORMATS["int8"])
    x = torch.randn(3, D, requires_grad=True)
    with pytest.raises(ConfigError, match="quantised experts are inference-only"):
        moe(x)
    with torch.no_grad():
        moe(x)


def test_group_size_must_divide_the_experts_dims():
    torch.manual_seed(0)
    experts = RoutedExperts(64, 96, 2)
    with pytest.raises(ConfigError, match=r"QuantFormat.group_size=64 does not divide the input dim of down_proj"):
        QuantizedExperts.from_experts(experts, QuantFormat(name="int4", group_size=64))


def _tiny_model() -> Transformer:
    moe = MoEConfig(d_model=D, d_expert=F, num_experts=E, top_k=K)
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=64, d_model=D, n_layers=2, n_heads=4, d_ff=64, moe=moe,
                                   max_seq_len=64)).eval()


def test_quantize_model_swaps_and_reports():
    model = _tiny_model()
    report = quantize_model(model, "int8")
    H = 2 * F
    per_layer_q = E * (H * D + D * F)  # one byte per weight
    per_layer_scales = 2 * E * (H + D)  # one bf16 scale per output row
    assert report.layers == 2 and report.format == "int8" and report.kernel_bytes == 0
    assert report.bytes_before == 2 * 4 * E * (H * D + D * F)
    assert report.bytes_after == 2 * (per_layer_q + per_layer_scales)
    assert all(isinstance(b.mlp.experts, QuantizedExperts) for b in model.layers)
    with pytest.raises(ConfigError, match="already QuantizedExperts"):
        quantize_model(model, "int8")
    with pytest.raises(ConfigError, match="what='attention' is not supported"):
        quantize_model(_tiny_model(), "int8", what="attention")


def test_quantize_model_int4_report():
    report = quantize_model(_tiny_model(), QuantFormat(name="int4", group_size=32))
    G, H = 32, 2 * F
    per_layer = E * (H * D + D * F) // 2 + 4 * E * (H * D + D * F) // G  # nibbles + bf16 (scale, zero) a group
    assert report.bytes_after == 2 * per_layer
    # The kernel's packed copy replaces the saved buffers in memory (its layout is the CPU
    # build's, so it is not what state_dict saves, but it is the same size): one copy.
    assert report.kernel_bytes == 0
    assert report.ratio == report.bytes_after / report.bytes_before


@pytest.mark.skipif(not qexperts.kernel_runs("int4"), reason="torch's int4 CPU kernel does not run here")
def test_int4_weights_are_resident_once_and_saved_unchanged():
    """After packing for the kernel the portable buffers are gone (one resident copy), yet
    state_dict gives them back bit for bit (read through the kernel), and loading a state
    dict into a packed module works."""
    model = _tiny_model()
    experts = model.layers[0].mlp.experts
    fmt = QuantFormat(name="int4", group_size=32)
    q = QuantizedExperts.from_experts(experts, fmt)  # packs at once
    fresh = QuantizedExperts(experts.d_model, experts.d_expert, experts.num_experts, experts.activation, fmt)
    with torch.no_grad():  # the same quantisation, never packed: the portable buffers as made
        for name, w in ((fresh.in_name, experts.w_in), ("down_proj", experts.down_proj)):
            qw, scale, zero = formats.quantize_int4(w, 32)
            getattr(fresh, f"{name}_qweight").copy_(formats.pack_int4(qw))
            getattr(fresh, f"{name}_scale").copy_(scale)
            getattr(fresh, f"{name}_zero").copy_(zero)
    assert all(b is None for b in q._buffers.values()) and q.resident_nbytes() == q.nbytes() == fresh.nbytes()
    saved, ref = q.state_dict(), fresh.state_dict()
    assert saved.keys() == ref.keys()
    for k in ref:
        assert torch.equal(saved[k], ref[k]), k
    # Load into a packed module: the buffers come back, get packed, and are dropped again.
    other = QuantizedExperts.from_experts(_tiny_model().layers[1].mlp.experts, fmt)
    other.load_state_dict(ref)
    x = torch.randn(5, D)
    counts = torch.tensor([2, 0, 3] + [0] * (E - 3))
    w = torch.rand(5)
    torch.testing.assert_close(other(x, counts, w), q(x, counts, w))
    assert all(b is None for b in other._buffers.values())


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["int8", QuantFormat(name="int4", group_size=32)], ids=["int8", "int4"])
def test_compiled_generation_runs_quantised_experts_and_equals_eager(fmt):
    model = _tiny_model()
    quantize_model(model, fmt)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    eager = generate(model, prompts, max_new_tokens=6)
    compiled = generate(model, prompts, max_new_tokens=6, compile=True)
    assert compiled.token_ids == eager.token_ids


def test_compiled_generation_refuses_quantised_experts_without_their_kernel(monkeypatch):
    from moelab.quant import experts as qexperts

    model = _tiny_model()
    quantize_model(model, "int8")
    monkeypatch.setitem(qexperts._PROBED, "int8", False)  # as on a torch without the kernel
    with pytest.raises(ConfigError, match="compile=True does not support these QuantizedExperts experts"):
        generate(model, [[1, 2, 3]], max_new_tokens=2, compile=True)


# ------------------------------------------------------------ the traced int8 path (compiled)


def test_traced_int8_rows_equal_the_kernel():
    """`int8_rows_traced` is what the kernel computes (bf16 in, float32 sums, bf16 out),
    row by row with each row's own matrix: eagerly the same to bf16 rounding."""
    if not qexperts.kernel_runs("int8"):
        pytest.skip("the int8 kernel does not run in this torch build")
    g = torch.Generator().manual_seed(0)
    q_ROI = torch.randint(-127, 128, (3, 40, 64), generator=g, dtype=torch.int8)
    s_RO = (torch.rand(3, 40, generator=g) * 0.01).to(formats.SCALE_DTYPE)
    x_RI = torch.randn(3, 64, generator=g)
    got = qexperts.int8_rows_traced(x_RI, q_ROI, s_RO)
    want = torch.stack([torch._weight_int8pack_mm(x_RI[r:r + 1].to(torch.bfloat16), q_ROI[r], s_RO[r])[0]
                        for r in range(3)])
    assert got.dtype == torch.bfloat16
    assert _rel(got.float(), want.float()) < 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("counts", [[0, 1, 0, 1], [2, 0, 0, 0], [1, 2, 0, 1], [3, 3, 1, 1], [5, 0, 4, 1]],
                         ids=["1tok", "dup", "mixed", "A8", "A10-op"])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("traced", [True, False], ids=["avx512", "avx2"])
def test_compiled_int8_experts_equal_the_dequantised_reference(activation, counts, traced, monkeypatch):
    """In a compiled graph the int8 experts run traced (`_traced_int8_experts`: each row
    reads its own expert's weights) up to `TRACED_INT8_MAX_ROWS` rows where that pays
    (`traced_int8_pays`: AVX512 builds; both answers forced here) and through the kernel
    op otherwise: both equal the float reference on the same rows."""
    if not qexperts.kernel_runs("int8"):
        pytest.skip("the int8 kernel does not run in this torch build")
    monkeypatch.setattr(qexperts, "traced_int8_pays", lambda: traced)
    torch._dynamo.reset()  # the compiled lambda below is one code object for every case
    q = QuantizedExperts.from_experts(_layer(activation).experts, FORMATS["int8"])
    ref = q.dequantized()
    counts_E = torch.tensor(counts)
    A = int(counts_E.sum())
    x_AD = torch.randn(A, D).to(torch.bfloat16).float()
    w_A = torch.rand(A)
    hits = []
    real = qexperts._traced_int8_experts
    fn = torch.compile(lambda x, c, w: q(x, c, w), fullgraph=True, dynamic=False)
    try:
        qexperts._traced_int8_experts = lambda *a: hits.append(1) or real(*a)
        with torch.no_grad():
            got = fn(x_AD, counts_E, w_A)
            want = ref(x_AD, counts_E, w_A)
    finally:
        qexperts._traced_int8_experts = real
    assert bool(hits) == (A <= qexperts.TRACED_INT8_MAX_ROWS and traced)
    assert _rel(got, want) < 2e-2


@pytest.mark.parametrize("rows, cols", [(64, 32), (128, 96), (1024, 256), (256, 512), (48, 64), (80, 128)])
def test_the_fast_int4_repack_is_the_kernels_own_conversion(rows, cols, monkeypatch):
    """`kernel_pack_int4` (byte operations on the portable nibbles, for rows a multiple of
    the block the layout probe found) against torch's `_convert_weight_to_int4pack_for_cpu`."""
    g = torch.Generator().manual_seed(rows + cols)
    q = torch.randint(0, 16, (rows, cols), generator=g, dtype=torch.uint8)
    want = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    packed = formats.pack_int4(q)
    assert torch.equal(qexperts.kernel_pack_int4(packed), want)
    # the layouts documented, measured on AVX512 (64-row blocks) and AVX2 (32) builds
    block = {"AVX512": 64, "AVX2": 32}.get(torch.backends.cpu.get_cpu_capability())
    if block is not None:
        assert qexperts.int4_pack_block() == block
        if rows % block == 0:
            assert torch.equal(qexperts._pack_int4_blocked(packed), want)
    monkeypatch.setattr(qexperts, "_PACK_BLOCK", [None])  # a build with another layout
    assert torch.equal(qexperts.kernel_pack_int4(packed), want)


def test_the_bf16_weights_of_the_many_rows_path_are_the_kernels_rounded_once():
    """`int8_weight_bf16` / `int4_weight_bf16` (from the kernel's blocked int4 copy) are the
    dequantised reference rounded to bf16, and the many-rows GEMM equals the kernel's
    product within the bf16 rounding of the weights."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(128, 96, generator=g) * 0.05
    q8, s8 = formats.quantize_int8(w)
    assert torch.equal(qexperts.int8_weight_bf16(q8, s8), formats.dequantize_int8(q8, s8).to(torch.bfloat16))
    q4, s4, z4 = formats.quantize_int4(w, 32)
    packed = qexperts.kernel_pack_int4(formats.pack_int4(q4))
    sz = qexperts.int4_scales_and_zeros(s4, z4)
    if torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX2"):
        assert torch.equal(qexperts._unpack_int4_blocked(packed), q4)
        assert torch.equal(qexperts.int4_weight_bf16(packed, sz, 32),
                           formats.dequantize_int4(q4, s4, z4).to(torch.bfloat16))
    x = torch.randn(300, 96, generator=g).to(torch.bfloat16)
    for dense, kernel in ((qexperts.int8_rows_mm(x, q8, s8), torch._weight_int8pack_mm(x, q8, s8)),
                          (qexperts.int4_rows_mm(x, packed, 32, sz), torch._weight_int4pack_mm_for_cpu(x, packed, 32, sz))):
        assert dense.dtype == torch.bfloat16 and dense.shape == (300, 128)
        assert _rel(dense.float(), kernel.float()) < 1e-2
    assert qexperts.int4_weight_bf16(packed[:48], sz[:, :48], 32) is None  # rows not whole blocks: the kernel


def test_the_dense_path_by_blocks_of_rows_equals_one_gemm(monkeypatch):
    """`_dense_rows_mm` multiplies `DENSE_BLOCK_ROWS` output rows at a time (the last block
    partial): the same product as one GEMM on the whole dequantised weight, in
    `dense_dtype`."""
    monkeypatch.setitem(qexperts.DENSE_MIN_ROWS, "int4_vnni", qexperts.DENSE_MIN_ROWS["int4"])  # 300 rows: dense
    g = torch.Generator().manual_seed(6)
    rows = 2 * qexperts.DENSE_BLOCK_ROWS + 64
    w = torch.randn(rows, 64, generator=g) * 0.05
    x = torch.randn(300, 64, generator=g).to(torch.bfloat16)
    q8, s8 = formats.quantize_int8(w)
    dt = qexperts.dense_dtype()  # bf16 with native bf16, else float32
    whole = (x.float() @ qexperts.int8_weight_bf16(q8, s8, dt).float().t())
    torch.testing.assert_close(qexperts.int8_rows_mm(x, q8, s8).float(), whole, rtol=1e-2, atol=1e-3)
    q4, s4, z4 = formats.quantize_int4(w, 32)
    packed, sz = qexperts.kernel_pack_int4(formats.pack_int4(q4)), qexperts.int4_scales_and_zeros(s4, z4)
    if qexperts._layout_is_known():
        whole4 = x.float() @ formats.dequantize_int4(q4, s4, z4).to(dt).float().t()
        torch.testing.assert_close(qexperts.int4_rows_mm(x, packed, 32, sz).float(), whole4, rtol=1e-2, atol=1e-3)
