"""moelab's int4 x int8 kernel (`moelab.quant.vnni`: the AVX512-VNNI or the AVX2 variant,
whichever this CPU runs) against its reference, the rules for when `int4_rows_mm` takes
it, and what a machine without it gets.

The kernel tests skip, saying why, where the kernel cannot build or run (a CPU with
neither AVX512-VNNI/VBMI nor AVX2, no C compiler); the reference and fallback tests run
everywhere."""

from __future__ import annotations

import logging

import pytest
import torch

from moelab.quant import QuantFormat, formats, quantize_model, vnni
from moelab.quant import experts as qe

needs_kernel = pytest.mark.skipif(not qe.vnni_runs(), reason=f"the VNNI kernel cannot run here: "
                                  f"{vnni.unavailable_reason() or 'its probe failed'}")


def _int4(O: int, I: int, G: int, seed: int = 0):  # noqa: E741
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(O, I, generator=g) * 0.02
    w[1, :G] = 0.0  # a constant group (scale 0)
    q, s, z = formats.quantize_int4(w, G)
    return w, q, s, z, qe.kernel_pack_int4(formats.pack_int4(q)), qe.int4_scales_and_zeros(s, z)


def _bf16_close(y: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal up to the order of the float32 sums: one bf16 step apart at most (2^-7 of the
    value, at worst), with a floor for outputs that are sums of cancelling terms."""
    y, ref = y.float(), ref.float()
    tol = 2 ** -7 * ref.abs() + 1e-4 * float(ref.abs().max())
    assert bool(((y - ref).abs() <= tol).all()), float((y - ref).abs().max())


# ---------------------------------------------------------------------------- the reference


def test_quantize_activations_rounds_each_block_to_int8_steps():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 96, generator=g) * torch.tensor([1.0, 100.0, 1e-3]).unsqueeze(-1)
    x[2, 32:64] = 0.0  # an all-zero block stays zero
    xd = vnni.quantize_activations(x)
    step = x.view(3, 3, 32).abs().amax(-1, keepdim=True) / 127
    err = (xd - x).view(3, 3, 32).abs()
    assert bool((err <= step / 2 * (1 + 1e-5) + 1e-12).all())  # round to nearest: half a step at most
    assert torch.equal(xd[2, 32:64], torch.zeros(32))
    codes = xd.view(3, 3, 32) / torch.where(step > 0, step, 1.0)
    assert torch.allclose(codes, codes.round(), atol=1e-3)  # each value is an int8 step
    assert float(codes.abs().max()) <= 127.001


def test_reference_is_rounded_activations_times_dequantised_weights():
    w, q, s, z, _, _ = _int4(128, 256, 64)
    x = torch.randn(2, 256).to(torch.bfloat16)
    ref = vnni.reference_w4a8_mm(x, q, s, z)
    plain = vnni.quantize_activations(x) @ formats.dequantize_int4(q, s, z).t()
    _bf16_close(ref, plain)
    # and near the float product: the activation rounding is small beside int4's own error
    exact = x.float() @ w.t()
    assert float((ref.float() - exact).norm() / exact.norm()) < 0.2


# ---------------------------------------------------------------------------- the kernel


@needs_kernel
@pytest.mark.parametrize("G", [32, 64, 128])
@pytest.mark.parametrize("R", [1, 2, 3, 5])
@pytest.mark.parametrize("O,I", [(64, 128), (192, 384), (128, 1024)])
def test_kernel_equals_reference(G, R, O, I):  # noqa: E741
    if I % G:
        pytest.skip("group does not divide I")
    _, q, s, z, packed, sz = _int4(O, I, G, seed=R)
    g = torch.Generator().manual_seed(R)
    x = (torch.randn(R, I, generator=g) * torch.logspace(-3, 2, R).unsqueeze(-1)).to(torch.bfloat16)
    x[0, :32] = 0.0  # an all-zero activation block
    x[-1, 5] = 300.0  # an outlier: its block's scale is large
    _bf16_close(vnni.w4a8_mm(x, packed, G, sz), vnni.reference_w4a8_mm(x, q, s, z))


@needs_kernel
def test_kernel_threads_give_the_same_numbers():
    _, q, s, z, packed, sz = _int4(64 * 16, 256, 128)
    x = torch.randn(4, 256).to(torch.bfloat16)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = vnni.w4a8_mm(x, packed, 128, sz)
        torch.set_num_threads(2)
        two = vnni.w4a8_mm(x, packed, 128, sz)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)  # each block of rows is one thread's, summed in one order


@needs_kernel
def test_kernel_refuses_what_it_does_not_take():
    _, _, _, _, packed, sz = _int4(64, 128, 32)
    x = torch.randn(1, 128).to(torch.bfloat16)
    with pytest.raises(TypeError, match="bf16 x"):
        vnni.w4a8_mm(x.float(), packed, 32, sz)
    with pytest.raises(ValueError, match="do not fit"):
        vnni.w4a8_mm(torch.randn(1, 64).to(torch.bfloat16), packed, 32, sz)
    assert not vnni.fits(1, 48, 128, 32) and not vnni.fits(1, 64, 128, 48) and vnni.fits(1, 128, 256, 64)


# ---------------------------------------------------------------------------- the rules


@needs_kernel
def test_int4_rows_mm_takes_the_kernel_where_the_work_pays_for_its_call():
    O, I, G = 1024, 256, 128  # noqa: E741
    assert O * I * 2 >= qe.VNNI_MIN_WORK  # one row is enough
    _, q, s, z, packed, sz = _int4(O, I, G)
    torch_mm = torch._weight_int4pack_mm_for_cpu
    for R in (1, 7, 64):
        x = torch.randn(R, I).to(torch.bfloat16)
        assert torch.equal(qe.int4_rows_mm(x, packed, G, sz), vnni.w4a8_mm(x, packed, G, sz))
        with vnni.disabled():  # torch's kernel, bit for bit
            assert torch.equal(qe.int4_rows_mm(x, packed, G, sz), torch_mm(x, packed, G, sz))
    _, _, _, _, small, small_sz = _int4(256, 128, G)  # 32k weights: torch's kernel at one row ...
    x = torch.randn(1, 128).to(torch.bfloat16)
    assert torch.equal(qe.int4_rows_mm(x, small, G, small_sz), torch_mm(x, small, G, small_sz))
    x = torch.randn(16, 128).to(torch.bfloat16)  # ... ours from 16 rows (2^19 / 32k - 1 = 15)
    assert torch.equal(qe.int4_rows_mm(x, small, G, small_sz), vnni.w4a8_mm(x, small, G, small_sz))


@needs_kernel
def test_the_dense_path_takes_over_from_its_own_threshold(monkeypatch):
    O, I, G = 1024, 256, 64  # noqa: E741
    _, q, s, z, packed, sz = _int4(O, I, G)
    monkeypatch.setitem(qe.DENSE_MIN_ROWS, "int4", 8)
    monkeypatch.setitem(qe.DENSE_MIN_ROWS, "int4_vnni", 8)
    x = torch.randn(8, I).to(torch.bfloat16)
    dense = x @ qe.int4_weight_bf16(packed, sz, G).t()
    assert torch.allclose(qe.int4_rows_mm(x, packed, G, sz).float(), dense.float(), rtol=1e-2, atol=1e-2)
    assert not torch.equal(qe.int4_rows_mm(x, packed, G, sz), vnni.w4a8_mm(x, packed, G, sz))
    monkeypatch.setitem(qe.DENSE_MIN_ROWS, "int4_vnni", 9)  # the threshold the kernel's CPUs use
    if "amx_bf16" not in qe.cpu_flags():
        assert torch.equal(qe.int4_rows_mm(x, packed, G, sz), vnni.w4a8_mm(x, packed, G, sz))


@needs_kernel
def test_compiled_decode_with_the_kernel_writes_the_eager_tokens_and_disabled_holds():
    """A model whose experts and LM head take the kernel: compiled greedy decode equals
    eager; `vnni.disabled()` reaches graphs compiled with the kernel on (the op reads it
    when it runs), giving torch's kernel's tokens."""
    from moelab.infer.generate import generate
    from moelab.model import ModelConfig, Transformer
    from moelab.moe import MoEConfig

    torch.manual_seed(0)
    D = 256
    cfg = ModelConfig(vocab_size=1024, d_model=D, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                      moe=MoEConfig(d_model=D, d_expert=512, num_experts=4, top_k=2))
    model = Transformer(cfg).eval()
    quantize_model(model, QuantFormat(name="int4", group_size=128), what="all")
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12]]
    eager = generate(model, prompts, max_new_tokens=6).token_ids
    assert generate(model, prompts, max_new_tokens=6, compile=True).token_ids == eager
    with vnni.disabled():
        off_eager = generate(model, prompts, max_new_tokens=6).token_ids
        assert generate(model, prompts, max_new_tokens=6, compile=True).token_ids == off_eager
    calls = []
    real = vnni.w4a8_mm_unchecked
    try:
        vnni.w4a8_mm_unchecked = lambda *a: calls.append((a[0].shape[0], *a[1].shape)) or real(*a)
        generate(model, prompts[:1], max_new_tokens=2)
    finally:
        vnni.w4a8_mm_unchecked = real
    assert calls and all(o * 2 * p * (r + 1) >= qe.VNNI_MIN_WORK for r, o, p in calls)  # only work worth it
    assert (1, 1024, 128) in calls  # decode's single row: the LM head (the experts: one call a layer)


# ---------------------------------------------------------------------------- a layer in one call


def _layer(D: int, F: int, E: int, G: int, seed: int = 0):  # noqa: N803
    from moelab.moe.experts import RoutedExperts

    torch.manual_seed(seed)
    fe = RoutedExperts(D, F, E, "swiglu")
    fe.reset_parameters()
    return qe.QuantizedExperts.from_experts(fe, QuantFormat(name="int4", group_size=G))


def _routing(T: int, E: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    expert_A = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).flatten()
    order_A = torch.argsort(expert_A, stable=True)
    token_A = torch.arange(T).repeat_interleave(k)[order_A]
    return token_A, torch.bincount(expert_A, minlength=E), torch.rand(T * k, generator=g)[order_A]


@needs_kernel
@pytest.mark.parametrize("D,F,G", [(128, 64, 32), (256, 96, 32), (192, 256, 64), (768, 1024, 128)])
@pytest.mark.parametrize("T", [1, 5, 40])
def test_the_fused_layer_equals_the_per_expert_loop(D, F, G, T, monkeypatch):  # noqa: N803
    """`run_int4_fused` (the layer in one C call) against the per-expert loop of `w4a8_mm`
    calls it replaces (every matrix on the kernel: `VNNI_MIN_WORK` 0): rows grouped by
    expert and tokens with the gather and combine fused, float32 and bf16 tokens. The
    activation's exp is the kernel's own, so an activation can land one bf16 step from
    torch's, which moves its block's int8 rounding: close, not always equal."""
    monkeypatch.setattr(qe, "VNNI_MIN_WORK", 0)
    E = 8
    experts = _layer(D, F, E, G, seed=T)
    assert qe.fused_int4_fits(D, F, G, "swiglu")
    token_A, counts_E, weight_A = _routing(T, E, 2, seed=D + T)
    g = torch.Generator().manual_seed(T)
    x_TD = torch.randn(T, D, generator=g) * 3
    for x in (x_TD, x_TD.to(torch.bfloat16)):
        fused = qe.INT4.forward_gathered(experts, x, token_A, counts_E, weight_A)
        loop = qe._INT4_LOOP.forward_gathered(experts, x, token_A, counts_E, weight_A)
        assert fused.dtype == loop.dtype == x.dtype and fused.shape == (T, D)
        torch.testing.assert_close(fused.float(), loop.float(), rtol=2 ** -6, atol=2e-3 * float(loop.abs().max()))
        with vnni.unfused():  # the side-by-side switch: the loop itself
            assert torch.equal(qe.INT4.forward_gathered(experts, x, token_A, counts_E, weight_A), loop)
        fused_A = qe.INT4.forward(experts, x[token_A], counts_E, weight_A)
        loop_A = qe._INT4_LOOP.forward(experts, x[token_A], counts_E, weight_A)
        torch.testing.assert_close(fused_A.float(), loop_A.float(), rtol=2 ** -6, atol=2e-3 * float(loop_A.abs().max()))
    with torch.no_grad():
        ref = experts.dequantized()(x_TD[token_A], counts_E, weight_A)  # the float32 weights: int4's own error
    assert float((fused_A.float() - ref).norm() / ref.norm()) < 0.05


@needs_kernel
def test_the_fused_activation_holds_for_large_gates(monkeypatch):
    """Gates of hundreds (where the kernel's exp clamps its input: silu(g) is g, or -0)
    and near zero in one row: the fused layer still equals the loop, whose silu is torch's."""
    monkeypatch.setattr(qe, "VNNI_MIN_WORK", 0)
    D, F, G, E = 128, 64, 32, 1  # noqa: N806
    experts = _layer(D, F, E, G)
    x = torch.linspace(-1, 1, D).pow(3).unsqueeze(0) * 3000
    counts, w = torch.tensor([1]), torch.tensor([0.7])
    fused = qe.run_int4_fused(x, counts, w, *experts.int4_kernel_weights("in"), *experts.int4_kernel_weights("out"), G)
    loop = qe._INT4_LOOP.forward(experts, x, counts, w)
    torch.testing.assert_close(fused, loop, rtol=2 ** -6, atol=2e-3 * float(loop.abs().max()))


@needs_kernel
def test_the_fused_layer_refuses_bad_counts_and_hands_many_rows_back():
    D, F, G, E = 128, 64, 32, 4  # noqa: N806
    experts = _layer(D, F, E, G)
    (p_in, sz_in), (p_out, sz_out) = experts.int4_kernel_weights("in"), experts.int4_kernel_weights("out")
    x = torch.randn(6, D).to(torch.bfloat16)
    w = torch.rand(6)
    call = lambda counts, idx=None, max_rows=1000, combine=False: vnni.w4a8_swiglu_experts(  # noqa: E731
        x, idx, torch.tensor(counts), w, p_in, sz_in, p_out, sz_out, G, combine=combine, max_rows=max_rows)
    with pytest.raises(ValueError, match="do not fit"):
        call([2, 2, 1, 0])  # 5 rows counted, 6 given
    with pytest.raises(ValueError, match="do not fit"):
        call([3, 3, 0, 0], idx=torch.tensor([0, 1, 2, 3, 4, 9]), combine=True)  # token 9 of 6
    assert call([3, 3, 0, 0], max_rows=2) is None  # an expert past max_rows: the caller's dense path
    assert call([3, 3, 0, 0]).shape == (6, D)
    with pytest.raises(ValueError, match="do not fit"):
        call([4, -1, 3, 0])  # a negative count
    with pytest.raises(TypeError, match="bf16 x"):
        vnni.w4a8_swiglu_experts(x.float(), None, torch.tensor([3, 3, 0, 0]), w, p_in, sz_in, p_out, sz_out, G,
                                 combine=False, max_rows=1000)


# ---------------------------------------------------------------------------- without it


def _fresh_state(monkeypatch):
    monkeypatch.setattr(vnni, "_state", {})
    monkeypatch.setattr(qe, "_PROBED", {k: v for k, v in qe._PROBED.items() if k != "vnni"})


def test_no_compiler_falls_back_to_torchs_kernel_and_says_why(monkeypatch, caplog):
    _fresh_state(monkeypatch)
    monkeypatch.setenv("CC", "no-such-compiler-xyz")
    monkeypatch.setattr(vnni, "cpu_flags", lambda: frozenset(vnni.REQUIRED_FLAGS))
    assert "no C compiler" in vnni.unavailable_reason()
    with caplog.at_level(logging.INFO, logger="moelab.quant.experts"):
        assert not qe.vnni_runs()
    assert "torch's int4 kernel" in caplog.text and "no C compiler" in caplog.text
    _, q, s, z, packed, sz = _int4(1024, 256, 128)
    x = torch.randn(1, 256).to(torch.bfloat16)
    assert torch.equal(qe.int4_rows_mm(x, packed, 128, sz), torch._weight_int4pack_mm_for_cpu(x, packed, 128, sz))
    with pytest.raises(RuntimeError, match="not available: no C compiler"):
        vnni.w4a8_mm(x, packed, 128, sz)


def test_a_cpu_without_the_instructions_is_told_which(monkeypatch):
    _fresh_state(monkeypatch)
    monkeypatch.setattr(vnni, "cpu_flags", lambda: frozenset({"avx512f", "avx512bw", "fma"}))
    why = vnni.unavailable_reason()
    assert "avx512_vnni" in why and "avx512vbmi" in why and "int4_vnni.c" in why
    assert "avx2 (for int4_avx2.c)" in why  # what the fallback variant needs, too
    assert vnni.variant() is None and not vnni.fits(1, 128, 256, 64)


def test_the_variant_follows_the_cpu_and_must_read_torchs_packing(monkeypatch, caplog):
    """AVX512 with VNNI/VBMI builds int4_vnni.c (64-row blocks), else AVX2 + FMA builds
    int4_avx2.c (32); a torch whose packing blocks differ from the variant's gets torch's
    kernel, and is told why."""
    _fresh_state(monkeypatch)
    monkeypatch.setattr(vnni, "cpu_flags", lambda: frozenset({*vnni.REQUIRED_FLAGS, "avx2", "fma"}))
    assert vnni.variant().source.name == "int4_vnni.c" and vnni.out_block() == 64
    assert vnni.fits(1, 128, 256, 64) and not vnni.fits(1, 96, 256, 64)
    _fresh_state(monkeypatch)
    monkeypatch.setattr(vnni, "cpu_flags", lambda: frozenset({"avx2", "fma", "avx512f"}))  # Skylake-X-like
    assert vnni.variant().source.name == "int4_avx2.c" and vnni.out_block() == 32
    assert vnni.fits(1, 96, 256, 64)
    monkeypatch.setattr(qe, "_PACK_BLOCK", [64])  # torch's AVX512 packing, which int4_avx2.c does not read
    monkeypatch.setattr(vnni, "unavailable_reason", lambda: None)
    with caplog.at_level(logging.INFO, logger="moelab.quant.experts"):
        assert not qe.vnni_runs()
    assert "packs int4 weights in 64-row blocks, the avx2 kernel reads 32" in caplog.text


def test_a_failing_build_says_so_and_leaves_no_file(monkeypatch, tmp_path):
    _fresh_state(monkeypatch)
    monkeypatch.setenv("MOELAB_KERNEL_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # exists, fails
    monkeypatch.setattr(vnni, "cpu_flags", lambda: frozenset(vnni.REQUIRED_FLAGS))
    assert "could not build int4_vnni.c" in vnni.unavailable_reason()
    assert list(tmp_path.iterdir()) == []


def test_env_turns_it_off(monkeypatch):
    _fresh_state(monkeypatch)
    monkeypatch.setenv("MOELAB_INT4_VNNI", "0")
    assert vnni.unavailable_reason() == "MOELAB_INT4_VNNI=0"
    assert not qe.vnni_runs()


@needs_kernel
def test_the_build_is_cached_by_source_and_compiler(monkeypatch, tmp_path):
    _fresh_state(monkeypatch)
    monkeypatch.setenv("MOELAB_KERNEL_DIR", str(tmp_path))
    assert vnni.unavailable_reason() is None
    built = list(tmp_path.glob(f"{vnni.variant().source.stem}-*.so"))
    assert len(built) == 1 and not list(tmp_path.glob("*.tmp"))
    mtime = built[0].stat().st_mtime_ns
    _fresh_state(monkeypatch)
    assert vnni.unavailable_reason() is None
    assert built[0].stat().st_mtime_ns == mtime  # loaded, not rebuilt
