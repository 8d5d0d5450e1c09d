"""Quantised routed experts: int8 / int4 weights behind the experts-backend seam.

Legend: A rows (kept assignments, grouped by expert), T tokens, D model dim, F expert
hidden dim, E experts, H = 2F (swiglu) or F (gelu) rows of the input projection, O / I a
projection's output / input dim, N groups per row (int4), R rows of one expert.

`QuantizedExperts` is a sibling of `moelab.moe.RoutedExperts` that an MoE layer holds as
``moe.experts`` after a runtime module swap (gpt-fast style: `quantize_model`). It
computes the same ``y_A = (act(x_A W_in[e]^T) * w_A) W_out[e]^T`` with each ``W`` the
dequantised weight of its format (`moelab.quant.formats`), and offers ``backend(x)`` and
``forward(x_AD, tokens_per_expert_E, weight_A)`` like the float experts do, so the local
dispatcher runs it unchanged (and takes its fused ``forward_gathered``).

Backends, picked per call:
  ``int8``/``int4``: per expert with rows, torch's weight-only CPU kernels
      (`torch._weight_int8pack_mm`, `torch._weight_int4pack_mm_for_cpu`) on **bf16**
      activations: with float32 activations the int8 kernel measured 2.4x slower than a
      plain float32 GEMM. The activation between the two GEMMs is computed in float32;
      the output is cast back to the input dtype. int4 takes moelab's own int4 x int8
      kernel where it runs (`moelab.quant.vnni`), for swiglu experts the whole layer in
      one C call (`run_int4_fused`, whose reference is the per-expert loop).
  ``dequant``: where a kernel is missing or does not run (torch versions differ; probed
      once per process on a tiny input, said once in the log) or the shapes do not fit
      it, each used expert's weights are dequantised to float32 for the call and run as
      plain GEMMs: slower, same weights.

Inference only: these weights have no gradient, so a call that would need one is
refused (`ConfigError`) rather than silently cutting the graph.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import nn

from moelab.errors import ConfigError
from moelab.hardware import cpu_flags
from moelab.moe import traced
from moelab.moe.cpu_kernels import act_forward, per_expert_rows
from moelab.moe.experts import ExpertsBackend, RoutedExperts, native_bf16
from moelab.quant import formats, vnni
from moelab.quant.formats import QuantFormat

log = logging.getLogger(__name__)

KERNEL_DTYPE = torch.bfloat16  # the activations the kernels see
# torch's int4 CPU packing also needs output rows in multiples of 16: always so here,
# since a group size (>= 32) divides both D and F, and the output rows are D, F or 2F.


# ---------------------------------------------------------------------------- kernel probes


def _probe_int8() -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (16, 32), generator=g, dtype=torch.int8)
    s = torch.rand(16, generator=g).add_(0.5).to(KERNEL_DTYPE)
    x = torch.randn(3, 32, generator=g).to(KERNEL_DTYPE)
    y = torch._weight_int8pack_mm(x, q, s)
    _check_probe("int8", y, x.float() @ formats.dequantize_int8(q, s).t())


def _probe_int4() -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (16, 64), generator=g, dtype=torch.uint8)
    s = torch.rand(16, 2, generator=g).add_(0.5).to(KERNEL_DTYPE)
    z = torch.randn(16, 2, generator=g).to(KERNEL_DTYPE)
    x = torch.randn(3, 64, generator=g).to(KERNEL_DTYPE)
    packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    y = torch._weight_int4pack_mm_for_cpu(x, packed, 32, int4_scales_and_zeros(s, z))
    _check_probe("int4", y, x.float() @ formats.dequantize_int4(q, s, z).t())


def _check_probe(name: str, y: torch.Tensor, ref: torch.Tensor) -> None:
    # bf16 output: a relative error of a few 2^-9 is rounding; more is a different contract.
    if not torch.allclose(y.float(), ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max())):
        raise RuntimeError(f"the {name} kernel ran but disagrees with the dequantised weights")


_PROBES: dict[str, Callable[[], None]] = {"int8": _probe_int8, "int4": _probe_int4}
_PROBED: dict[str, bool] = {}


def kernel_runs(name: str) -> bool:
    """Whether the CPU kernel of format `name` exists and computes what the format says
    (probed once per process on a tiny input)."""
    if name not in _PROBED:
        try:
            _PROBES[name]()
            _PROBED[name] = True
        except (AttributeError, RuntimeError, NotImplementedError, TypeError) as e:
            log.warning("the %s experts kernel does not run in torch %s (%s): quantised experts are "
                        "dequantised for each call instead (slower, same weights)", name, torch.__version__, e)
            _PROBED[name] = False
    return _PROBED[name]


def int4_scales_and_zeros(scale_ON: torch.Tensor, zero_ON: torch.Tensor) -> torch.Tensor:
    """The int4 CPU kernel's ``qScaleAndZeros``: ``[N, O, 2]`` (scale, zero) per group and
    output row, contiguous, in the activations' dtype (bf16 here)."""
    return torch.stack([scale_ON, zero_ON], dim=-1).transpose(0, 1).contiguous().to(KERNEL_DTYPE)


# torch's int4 CPU packing (measured in torch 2.13) is blocked by B output rows, B = 64 on
# an AVX512 build and 32 on an AVX2 one: block b's bytes, in order, are [I, B/2]: byte
# (k, j) holds input k of row Bb + j in its low nibble and of row Bb + B/2 + j in its high
# one. Other builds (or output rows not a multiple of B) may differ: `int4_pack_block`
# finds B once by comparing this layout with the kernel's own conversion, and without a
# match everything converts through the kernel.
_PACK_BLOCKS = (64, 32)


def _pack_int4_blocked(qweight_OP: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """The portable nibbles ``[O, I/2]`` (`formats.pack_int4`) in the blocked layout above
    (``block`` rows, this build's by default), by byte operations on the packed form (no
    [O, I] int32 copy)."""
    block = block or int4_pack_block()
    O, P = qweight_OP.shape  # noqa: E741
    half = block // 2
    pb = qweight_OP.view(O // block, 2, half, P)  # (block, rows j / rows B/2 + j, j, column pair)
    lo, hi = pb[:, 0], pb[:, 1]
    even = (lo & 0xF) | ((hi & 0xF) << 4)  # input 2c: the low nibbles of both halves
    odd = (lo >> 4) | (hi & 0xF0)  # input 2c + 1: the high nibbles
    return torch.stack([even.transpose(1, 2), odd.transpose(1, 2)], dim=2).reshape(O, P)  # (block, c, parity, j)


def _reference_pack_int4(qweight_OP: torch.Tensor) -> torch.Tensor:
    """The kernel's own conversion of the portable nibbles (the reference)."""
    return torch._convert_weight_to_int4pack_for_cpu(formats.unpack_int4(qweight_OP).to(torch.int32), 1)


_PACK_BLOCK: list[int | None] = []


def int4_pack_block() -> int | None:
    """Rows per block of this build's int4 packing when it is the documented blocked
    layout (64 or 32; checked once against the kernel's conversion), else None."""
    if not _PACK_BLOCK:
        g = torch.Generator().manual_seed(0)
        probe = torch.randint(0, 256, (2 * max(_PACK_BLOCKS), 48), generator=g, dtype=torch.uint8)
        want = _reference_pack_int4(probe)
        _PACK_BLOCK.append(next((b for b in _PACK_BLOCKS if torch.equal(_pack_int4_blocked(probe, b), want)), None))
    return _PACK_BLOCK[0]


def _layout_is_known() -> bool:
    """Whether this build's int4 packing is the documented blocked layout (checked once)."""
    return int4_pack_block() is not None


def _blocked(rows: int) -> bool:
    """Whether a matrix of `rows` output rows is packed in the documented blocked layout
    here (this build's packing checked once, and whole blocks)."""
    block = int4_pack_block()
    return block is not None and rows % block == 0


def kernel_pack_int4(qweight_OP: torch.Tensor) -> torch.Tensor:
    """``[O, I/2]`` portable nibbles -> the int4 CPU kernel's packed ``[O, I/2]``:
    `_pack_int4_blocked` (~5x faster: an offloaded int4 expert converts on every miss)
    where this build's layout was checked to be it, else `_reference_pack_int4`."""
    if _blocked(qweight_OP.shape[0]):
        return _pack_int4_blocked(qweight_OP.contiguous())
    return _reference_pack_int4(qweight_OP)


def _unpack_int4_blocked(packed_OP: torch.Tensor) -> torch.Tensor:
    """The inverse of `_pack_int4_blocked`, to nibble values: ``[O, I]`` uint8 in [0, 15]."""
    O, P = packed_OP.shape  # noqa: E741
    block = int4_pack_block()
    pb = packed_OP.reshape(O // block, P, 2, block // 2)  # (block, c, parity, j)
    q = torch.stack([pb & 0xF, pb >> 4], dim=1)  # (block, rows j / rows 32 + j, c, parity, j)
    return q.permute(0, 1, 4, 2, 3).reshape(O, 2 * P)  # row 64b + 32 half + j, input 2c + parity


def int8_weight_bf16(q_OI: torch.Tensor, scale_O: torch.Tensor, dtype: torch.dtype = KERNEL_DTYPE) -> torch.Tensor:
    """``q * scale`` as bf16 ``[O, I]``: the kernel's weight, rounded once to bf16 (q is
    an integer bf16 holds exactly, so the bf16 product is the float32 one, rounded); or,
    with ``dtype`` float32, the float32 product."""
    return q_OI.to(dtype) * scale_O.to(dtype).unsqueeze(-1)


def int4_weight_bf16(packed_OP: torch.Tensor, sz_NO2: torch.Tensor, group_size: int,
                     dtype: torch.dtype = KERNEL_DTYPE) -> torch.Tensor | None:
    """``(q - 8) * scale + zero`` as bf16 ``[O, I]`` from the kernel's copy (computed in
    float32, rounded once; ``dtype`` float32: not rounded), or None where this build's
    packing is not the documented one."""
    if not _blocked(packed_OP.shape[0]):
        return None
    O, P = packed_OP.shape  # noqa: E741
    q_ONG = _unpack_int4_blocked(packed_OP).view(O, 2 * P // group_size, group_size)
    scale_ON1, zero_ON1 = sz_NO2[..., 0].t().unsqueeze(-1).float(), sz_NO2[..., 1].t().unsqueeze(-1).float()
    return (q_ONG.float() - 8).mul_(scale_ON1).add_(zero_ON1).view(O, 2 * P).to(dtype)


def dense_dtype() -> torch.dtype:
    """The dense path's GEMM dtype: bf16 where the CPU has native bf16 (AMX or AVX512-BF16),
    else float32. Without it a bf16 GEMM is emulated: on a Zen 3 (AVX2) the bf16 dense path
    measured 4-9x slower than the kernels it was meant to beat at 32-128 rows (BENCHMARKS.md
    "int4 x int8 on AVX2")."""
    return KERNEL_DTYPE if native_bf16() else torch.float32


# Rows of one matrix from which its weights dequantised to bf16 and a bf16 GEMM beat
# torch's weight-only CPU kernels, whose time grows linearly with the rows (each row is a
# pass over the weights): prefill and wide serving batches, not single-stream decode.
# Measured (1 thread, AVX512-BF16; `python -m benchmarks.quant_prefill`, BENCHMARKS.md
# "Quantised experts: prefill"), kernel against the dense path by blocks, ms: int8, a
# [2048, 768] expert matrix 0.67 / 0.70 at 32 rows, 1.02 / 0.84 at 48, 11.1 / 4.9 at 512;
# a [28096, 768] LM head 17.0 / 11.8 at 48. int4's dequantisation (from the kernel's
# blocked copy, ~1 ns a weight against int8's ~0.3) pays from ~150-250 rows: experts 3.84 /
# 3.19 at 192, the LM head 51.7 / 50.9 at 192, 155 / 120 at 512; so it starts at 256.
# Without native bf16 the dense path is float32 (`dense_dtype`) and the same thresholds
# hold (Zen 3, AVX2, 1 thread, BENCHMARKS.md "int4 x int8 on AVX2"): int8 [2048, 768] 7.70
# / 6.35 at 64 rows, the LM head 79.9 / 41.7 at 32; int4 (torch's kernel) 15.3 / 12.1 at 128,
# 25.3 / 24.3 at 256.
DENSE_MIN_ROWS = {"int8": 48, "int4": 256}


# The dense path dequantises and multiplies a block of output rows at a time: a whole LM
# head (28096 x 768) dequantised at once is 43 MB of bf16 (86 MB of float32 for int4) that
# no cache holds, and measured 50 ms (int8) / 145 ms (int4) to dequantise, against 0.5 ms
# for a [2048, 768] expert matrix; in blocks every matrix costs what the small one does.
DENSE_BLOCK_ROWS = 1024  # a multiple of the int4 packing's 64- or 32-row blocks


def _dense_rows_mm(x_RI: torch.Tensor, d_out: int,
                   weight_block: Callable[[int, int, torch.dtype], torch.Tensor]) -> torch.Tensor:
    """``x W^T`` with W's rows ``[o0, o1)`` from ``weight_block(o0, o1, dtype)`` in
    `dense_dtype`, a block at a time: ``y^T`` by blocks of rows (contiguous), then
    transposed; out in ``x``'s dtype (bf16)."""
    dtype = dense_dtype()
    x = x_RI.to(dtype)
    y_OR = x.new_empty(d_out, x.shape[0])
    for o0 in range(0, d_out, DENSE_BLOCK_ROWS):
        o1 = min(d_out, o0 + DENSE_BLOCK_ROWS)
        torch.mm(weight_block(o0, o1, dtype), x.t(), out=y_OR[o0:o1])
    return y_OR.t().to(x_RI.dtype).contiguous()


def int8_rows_mm(x_RI: torch.Tensor, q_OI: torch.Tensor, scale_O: torch.Tensor) -> torch.Tensor:
    """``x W^T`` for int8 W (bf16 in and out): the weight-only kernel, or at
    ``DENSE_MIN_ROWS`` rows and more a bf16 GEMM on the dequantised weight, by blocks."""
    if x_RI.shape[0] >= DENSE_MIN_ROWS["int8"]:
        return _dense_rows_mm(x_RI, q_OI.shape[0], lambda o0, o1, dt: int8_weight_bf16(q_OI[o0:o1], scale_O[o0:o1], dt))
    return torch._weight_int8pack_mm(x_RI, q_OI, scale_O)


# Where moelab's int4 x int8 kernel (`moelab.quant.vnni`) replaces torch's int4 kernel:
# matrices of O x I weights at R rows with O * I * (R + 1) >= VNNI_MIN_WORK. Its call costs
# a fixed ~5 us (the op, ctypes), so small matrices need rows to pay it back; measured (1
# thread, `python -m benchmarks.int4_vnni`, BENCHMARKS.md "int4 x int8 (VNNI)"), ours /
# torch's time: [256, 128] 0.48x at 1 row, 0.98x at 16, 1.19x at 32; [512, 256] 0.90x at
# 1, 1.01x at 4, 1.23x at 8; [1024, 256] 1.27x at 1; [2048, 768] 1.89x at 1, ~2x from 32.
VNNI_MIN_WORK = 1 << 19
# ... and where it replaces the dense path: on this AVX512-BF16 CPU without AMX (bf16 GEMMs
# at ~360 GF/s) the kernel beats dequantise + bf16 GEMM at every row count measured up to
# 512 (1.3-1.8x: [2048, 768] 4.93 against 6.19 ms at 512 rows) and matches it at 1024-2048
# (0.95-1.23x), so int4 turns dense from DENSE_MIN_ROWS["int4_vnni"] rows there. With AMX
# (bf16 GEMMs ~4x faster: 1515 GF/s on a Sapphire Rapids) it keeps DENSE_MIN_ROWS["int4"]:
# not measured with this kernel, no AMX machine since it was written. On a Zen 3 (the AVX2
# kernel, float32 dense path) it also wins up to 1024 rows: 72.2 / 74.6 ms at 1024.
DENSE_MIN_ROWS["int4_vnni"] = 1024


def _int4_dense_min_rows(vnni_here: bool) -> int:
    # reads the probe's record only: this runs inside traced graphs too
    if vnni_here and not _PROBED["amx"]:
        return DENSE_MIN_ROWS["int4_vnni"]
    return DENSE_MIN_ROWS["int4"]


def _probe_vnni() -> None:
    """The VNNI kernel on two blocks of random weights against `vnni.reference_w4a8_mm`:
    the same float32 sums up to their order, so bf16 outputs one rounding apart at most."""
    g = torch.Generator().manual_seed(0)
    O, I, G = 128, 256, 64  # noqa: E741
    q = torch.randint(0, 16, (O, I), generator=g, dtype=torch.uint8)
    s = torch.rand(O, I // G, generator=g).add_(0.5).to(formats.SCALE_DTYPE)
    z = torch.randn(O, I // G, generator=g).to(formats.SCALE_DTYPE)
    x = torch.randn(3, I, generator=g).to(KERNEL_DTYPE)
    y = vnni.w4a8_mm(x, kernel_pack_int4(formats.pack_int4(q)), G, int4_scales_and_zeros(s, z)).float()
    ref = vnni.reference_w4a8_mm(x, q, s, z).float()
    if not torch.allclose(y, ref, rtol=2 ** -7, atol=1e-3 * float(ref.abs().max())):
        raise RuntimeError(f"it ran but disagrees with its reference (max diff {float((y - ref).abs().max()):.3g})")
    # The one-call layer (`vnni.w4a8_swiglu_experts`) against its loop of `w4a8_mm` calls:
    # two experts of D 128, F 64 on three rows.
    E, D, F = 2, 128, 64  # noqa: N806
    mats = {}
    for proj, (O, I) in (("in", (2 * F, D)), ("out", (D, F))):  # noqa: E741
        w = torch.randn(E, O, I, generator=g) * 0.1
        qs = [formats.quantize_int4(w[e], 32) for e in range(E)]
        mats[proj] = (torch.stack([kernel_pack_int4(formats.pack_int4(q)) for q, _, _ in qs]),
                      torch.stack([int4_scales_and_zeros(s_, z_) for _, s_, z_ in qs]))
    x, counts, w_A = torch.randn(3, D, generator=g).to(KERNEL_DTYPE), torch.tensor([2, 1]), torch.rand(3, generator=g)
    y = vnni.w4a8_swiglu_experts(x, None, counts, w_A, *mats["in"], *mats["out"], 32, combine=False, max_rows=3)
    ref = torch.cat([vnni.w4a8_mm((act_forward(vnni.w4a8_mm(x[rows], mats["in"][0][e], 32, mats["in"][1][e]).float(),
                                               "swiglu") * w_A[rows, None]).to(KERNEL_DTYPE),
                                  mats["out"][0][e], 32, mats["out"][1][e]).float()
                     for e, rows in ((0, slice(0, 2)), (1, slice(2, 3)))])
    if y is None or not torch.allclose(y, ref, rtol=2 ** -6, atol=2e-3 * float(ref.abs().max())):
        raise RuntimeError("its one-call layer disagrees with its loop of matmuls")


def vnni_runs() -> bool:
    """Whether int4 matrices may use moelab's int4 x int8 kernel now: it builds and loads
    here, this torch's int4 packing is the documented blocked layout, and it matches its
    reference on a probe, and ``MOELAB_INT4_VNNI`` is not ``0`` (checked once per process;
    why not, said once). `vnni.disabled` is read at each call, by the op."""
    if "vnni" not in _PROBED:
        why = vnni.unavailable_reason()
        if why is None and int4_pack_block() != vnni.out_block():
            found = int4_pack_block()
            why = (f"this torch build packs int4 weights in {found}-row blocks, the {vnni.variant_name()} kernel "
                   f"reads {vnni.out_block()}" if found else
                   "this torch build packs int4 weights in a layout it does not read")
        if why is None:
            try:
                _probe_vnni()
            except (RuntimeError, ValueError, TypeError, OSError) as e:
                why = str(e)
        _PROBED["vnni"] = why is None
        _PROBED["amx"] = "amx_bf16" in cpu_flags()
        # info, not a warning: torch's kernel is the ordinary path; this one is a speed-up
        log.info("int4 matrices: %s", f"moelab's int4 x int8 kernel ({vnni.variant_name()})" if why is None
                 else f"torch's int4 kernel, not moelab's int4 x int8 one ({why})")
    return _PROBED["vnni"]


def int4_rows_mm(x_RI: torch.Tensor, packed_OP: torch.Tensor, group_size: int, sz_NO2: torch.Tensor) -> torch.Tensor:
    """As `int8_rows_mm` for int4 W in the kernel's copy, with moelab's int4 x int8 kernel
    where it runs (`vnni_runs`) for all but the smallest work (`VNNI_MIN_WORK`), and the
    dense path from its own threshold then; torch's kernel where the copy's layout is not
    the documented one."""
    R, (O, P) = x_RI.shape[0], packed_OP.shape  # noqa: E741
    take_vnni = O * 2 * P * (R + 1) >= VNNI_MIN_WORK and vnni.fits(R, O, 2 * P, group_size) and vnni_runs()
    if R >= _int4_dense_min_rows(take_vnni) and _blocked(O):
        return _dense_rows_mm(x_RI, O, lambda o0, o1, dt: int4_weight_bf16(
            packed_OP[o0:o1], sz_NO2[:, o0:o1], group_size, dt))
    if take_vnni:  # eagerly straight to the kernel: the op's dispatch costs ~4 us a call
        if torch.compiler.is_compiling():
            return torch.ops.moelab.int4_few_rows_mm(x_RI, packed_OP, group_size, sz_NO2)
        return int4_few_rows_mm(x_RI, packed_OP, group_size, sz_NO2)
    return torch._weight_int4pack_mm_for_cpu(x_RI, packed_OP, group_size, sz_NO2)


# One op for compiled graphs (a `QuantizedLinear` is traced, a ctypes call is not
# traceable). It reads `vnni.enabled()` when it runs, not when it is traced, so
# `vnni.disabled()` holds for graphs compiled before it. Defined with the low-level
# `torch.library.Library` rather than `custom_op`: 6.4 against 10.1 us a call on a small
# matrix (the kernel itself ~1.5), and a decode step of the 207M model makes ~70.
_LIB = torch.library.Library("moelab", "FRAGMENT")
_LIB.define("int4_few_rows_mm(Tensor x, Tensor packed, int group_size, Tensor sz) -> Tensor")


def int4_few_rows_mm(x_RI: torch.Tensor, packed_OP: torch.Tensor, group_size: int,
                     sz_NO2: torch.Tensor) -> torch.Tensor:
    """The VNNI kernel (`vnni.w4a8_mm_unchecked`), or torch's int4 kernel inside `vnni.disabled()`."""
    if vnni.enabled():
        return vnni.w4a8_mm_unchecked(x_RI, packed_OP, group_size, sz_NO2)
    return torch._weight_int4pack_mm_for_cpu(x_RI, packed_OP, group_size, sz_NO2)


_LIB.impl("int4_few_rows_mm", int4_few_rows_mm, "CPU")
_LIB.impl("int4_few_rows_mm", lambda x, packed, group_size, sz: x.new_empty(x.shape[0], packed.shape[0]), "Meta")


def portable_from_kernel_int4(packed_OP: torch.Tensor, sz_NO2: torch.Tensor, group_size: int, d_in: int,
                              d_out: int) -> dict[str, torch.Tensor]:
    """The portable int4 form (``qweight`` nibbles ``[O, I/2]``, ``scale`` and ``zero``
    ``[O, N]``) of one matrix from the kernel's copy.

    The packed layout is the CPU build's, so it is read back through the kernel itself:
    with scale 1 and zero 8 the kernel's ``(q - 8) * scale + zero`` is ``q``, an integer
    bf16 holds exactly, so ``I_I @ W^T`` with the identity returns the nibbles."""
    N = d_in // group_size
    eye = torch.eye(d_in, dtype=KERNEL_DTYPE)
    unit = torch.stack([torch.ones(N, d_out), torch.full((N, d_out), 8.0)], dim=-1).to(KERNEL_DTYPE)
    q_OI = torch._weight_int4pack_mm_for_cpu(eye, packed_OP, group_size, unit).t()
    return {"qweight": formats.pack_int4(q_OI.round().to(torch.uint8)),
            "scale": sz_NO2[..., 0].t().contiguous().to(formats.SCALE_DTYPE),
            "zero": sz_NO2[..., 1].t().contiguous().to(formats.SCALE_DTYPE)}


_said: set[str] = set()


def _say_once(key: str, msg: str, *args: object) -> None:
    if key not in _said:
        _said.add(key)
        log.warning(msg, *args)


# ---------------------------------------------------------------------------- the runner

# mm(experts, proj, e, x_RI) -> y_RO: one expert's GEMM with one projection ("in"/"out").
ExpertMM = Callable[["QuantizedExperts", str, int, torch.Tensor], torch.Tensor]


def _int8_mm(experts: QuantizedExperts, proj: str, e: int, x_RI: torch.Tensor) -> torch.Tensor:
    return int8_rows_mm(x_RI, experts.qweight(proj)[e], experts.scale(proj)[e])


def _int4_mm(experts: QuantizedExperts, proj: str, e: int, x_RI: torch.Tensor) -> torch.Tensor:
    packed_EOP, sz_ENO2 = experts.int4_kernel_weights(proj)
    return int4_rows_mm(x_RI, packed_EOP[e], experts.fmt.group_size, sz_ENO2[e])


def _dequant_mm(experts: QuantizedExperts, proj: str, e: int, x_RI: torch.Tensor) -> torch.Tensor:
    return x_RI @ experts.dequantized_weight(proj, e).to(x_RI.device, x_RI.dtype).t()


def check_inference(x: torch.Tensor, weight_A: torch.Tensor) -> None:
    """Refuse a call that would need a gradient through the quantised experts."""
    if torch.is_grad_enabled() and (x.requires_grad or weight_A.requires_grad):
        raise ConfigError(
            "quantised experts are inference-only; run the model under torch.no_grad() or "
            "torch.inference_mode() (generate does), or train the float experts "
            "(QuantizedExperts.dequantized()) and quantise again"
        )


# mm(proj, e, x_RI) -> y_RO with the weights already bound.
BoundMM = Callable[[str, int, torch.Tensor], torch.Tensor]


def run_rows(
    x: torch.Tensor,
    counts_E: torch.Tensor,
    weight_A: torch.Tensor,
    mm: BoundMM,
    act_dtype: torch.dtype,
    activation: str,
    token_idx_A: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x_AD -> y_AD``, or with ``token_idx_A`` (fused gather and combine) ``x_TD -> y_TD``:
    per expert with rows, ``h = x W_in^T`` (``mm``), ``a = act(h) * w`` in float32,
    ``y = a W_out^T`` (``mm``), the GEMM inputs in ``act_dtype``."""
    check_inference(x, weight_A)
    w_A1 = weight_A.float().unsqueeze(-1)

    def expert(e: int, x_RD: torch.Tensor, rows: slice) -> torch.Tensor:
        h_RH = mm("in", e, x_RD).float()
        a_RF = act_forward(h_RH, activation).mul_(w_A1[rows])
        return mm("out", e, a_RF.to(act_dtype)).to(x.dtype)

    return per_expert_rows(x.to(act_dtype), counts_E, weight_A.shape[0], x.shape[1], expert, token_idx_A,
                           out_dtype=x.dtype)


def run_quantized(
    experts: QuantizedExperts,
    x: torch.Tensor,
    counts_E: torch.Tensor,
    weight_A: torch.Tensor,
    mm: ExpertMM,
    act_dtype: torch.dtype,
    token_idx_A: torch.Tensor | None = None,
) -> torch.Tensor:
    """`run_rows` with `mm` reading `experts`' weights."""
    return run_rows(x, counts_E, weight_A, lambda proj, e, x_RI: mm(experts, proj, e, x_RI), act_dtype,
                     experts.activation, token_idx_A)


def fused_int4_fits(d_model: int, d_expert: int, group_size: int, activation: str) -> bool:
    """Whether `run_int4_fused` can run int4 experts of these shapes (resident, or offloaded
    in the kernel's layout): swiglu, shapes the kernel takes (`vnni.experts_fit`), the
    kernel running here."""
    return activation == "swiglu" and vnni.experts_fit(d_model, d_expert, group_size) and vnni_runs()


def fused_max_rows() -> int:
    """The most rows of one expert `run_int4_fused` takes (from `int4_rows_mm`'s dense
    threshold on, the dense path is faster: the caller runs the per-expert loop then)."""
    return _int4_dense_min_rows(True) - 1


def int4_fused_expert(x_RD: torch.Tensor, weight_R: torch.Tensor, p_in: torch.Tensor, sz_in: torch.Tensor,
                      p_out: torch.Tensor, sz_out: torch.Tensor, group_size: int) -> torch.Tensor:
    """One expert's ``w_r * down(silu(gate) * up)`` (bf16 ``x_RD``, its ``[2F, D/2]`` and
    ``[D, F/2]`` packed projections) by the same C code as `run_int4_fused`, so that an
    offloaded expert computes what the resident layer does, bit for bit: float32 ``[R, D]``
    holding the bf16 outputs."""
    y = vnni.w4a8_swiglu_experts(x_RD, None, torch.tensor([x_RD.shape[0]]), weight_R, p_in.unsqueeze(0),
                                 sz_in.unsqueeze(0), p_out.unsqueeze(0), sz_out.unsqueeze(0), group_size,
                                 combine=False, max_rows=x_RD.shape[0])
    assert y is not None  # max_rows is the rows given
    return y


def run_int4_fused(x: torch.Tensor, counts_E: torch.Tensor, weight_A: torch.Tensor, p_in: torch.Tensor,
                   sz_in: torch.Tensor, p_out: torch.Tensor, sz_out: torch.Tensor, group_size: int,
                   token_idx_A: torch.Tensor | None = None) -> torch.Tensor | None:
    """`run_rows` with `int4_rows_mm` on the VNNI kernel, the whole layer in one C call
    (`vnni.w4a8_swiglu_experts`): the per-expert Python loop cost ~40 us a layer at decode,
    as much as the kernel's own work at one row. None where an expert has so many rows
    that `int4_rows_mm` would take the dense path (the caller runs the loop then).
    Same contract as `run_rows` (``x_AD -> y_AD``, or with ``token_idx_A`` ``x_TD ->
    y_TD``); the tokens' sums are in float32 for float32 ``x`` and in ``x``'s dtype
    otherwise, as the loop's."""
    check_inference(x, weight_A)
    max_rows = fused_max_rows()
    combine = token_idx_A is not None and x.dtype == torch.float32
    y = vnni.w4a8_swiglu_experts(x.to(KERNEL_DTYPE), token_idx_A, counts_E, weight_A, p_in, sz_in, p_out, sz_out,
                                 group_size, combine=combine, max_rows=max_rows)
    if y is None or combine:
        return y
    if token_idx_A is None:
        return y.to(x.dtype)
    return x.new_zeros(x.shape[0], y.shape[1]).index_add_(0, token_idx_A, y.to(x.dtype))


# ---------------------------------------------------------------------------- compiled graphs

# Inside a `torch.compile`d decode step (``generate(compile=True)``) the quantised experts'
# GEMMs are one opaque op each, as the float experts' are (`moelab.moe.ops`): which experts
# run on how many rows is data dependent (the eager loop reads ``counts.tolist()``), and
# torch's weight-only kernels are not inductor's to trace. The op runs the same eager loop
# on the same kernels, so compiled and eager decode compute the same numbers.


@torch.library.custom_op("moelab::int8_expert_ffn", mutates_args=())
def int8_expert_ffn(x_AD: torch.Tensor, q_in_EOI: torch.Tensor, s_in_EO: torch.Tensor, q_out_EOI: torch.Tensor,
                    s_out_EO: torch.Tensor, weight_A: torch.Tensor, tokens_per_expert_E: torch.Tensor,
                    activation: str) -> torch.Tensor:
    w = {"in": (q_in_EOI, s_in_EO), "out": (q_out_EOI, s_out_EO)}

    def mm(proj: str, e: int, x_RI: torch.Tensor) -> torch.Tensor:
        q, scale = w[proj]
        return int8_rows_mm(x_RI, q[e], scale[e])

    return run_rows(x_AD, tokens_per_expert_E, weight_A, mm, KERNEL_DTYPE, activation)


@int8_expert_ffn.register_fake
def _(x_AD, q_in_EOI, s_in_EO, q_out_EOI, s_out_EO, weight_A, tokens_per_expert_E, activation):
    return x_AD.new_empty(x_AD.shape[0], q_out_EOI.shape[1])


@torch.library.custom_op("moelab::int4_expert_ffn", mutates_args=())
def int4_expert_ffn(x_AD: torch.Tensor, p_in: torch.Tensor, sz_in: torch.Tensor, p_out: torch.Tensor,
                    sz_out: torch.Tensor, weight_A: torch.Tensor, tokens_per_expert_E: torch.Tensor,
                    group_size: int, d_model: int, activation: str) -> torch.Tensor:
    return _int4_loop(x_AD, p_in, sz_in, p_out, sz_out, weight_A, tokens_per_expert_E, group_size, activation)


def _int4_loop(x_AD, p_in, sz_in, p_out, sz_out, weight_A, tokens_per_expert_E, group_size, activation):
    w = {"in": (p_in, sz_in), "out": (p_out, sz_out)}

    def mm(proj: str, e: int, x_RI: torch.Tensor) -> torch.Tensor:
        packed, sz = w[proj]
        return int4_rows_mm(x_RI, packed[e], group_size, sz[e])

    return run_rows(x_AD, tokens_per_expert_E, weight_A, mm, KERNEL_DTYPE, activation)


@int4_expert_ffn.register_fake
def _(x_AD, p_in, sz_in, p_out, sz_out, weight_A, tokens_per_expert_E, group_size, d_model, activation):
    return x_AD.new_empty(x_AD.shape[0], d_model)


# The fused layer (`run_int4_fused`) as one op of the low-level library, as
# `int4_few_rows_mm` (its dispatch is cheaper than `custom_op`'s). When it runs it reads
# `vnni.enabled()`, `vnni.fused_enabled()` and the rows per expert, and falls back to the
# per-expert loop.
_LIB.define("int4_swiglu_experts(Tensor x, Tensor counts, Tensor weight, Tensor p_in, Tensor sz_in, "
            "Tensor p_out, Tensor sz_out, int group_size) -> Tensor")


def _int4_swiglu_experts(x_AD, counts_E, weight_A, p_in, sz_in, p_out, sz_out, group_size):
    fused = vnni.enabled() and vnni.fused_enabled()
    y = run_int4_fused(x_AD, counts_E, weight_A, p_in, sz_in, p_out, sz_out, group_size) if fused else None
    if y is None:
        return _int4_loop(x_AD, p_in, sz_in, p_out, sz_out, weight_A, counts_E, group_size, "swiglu")
    return y


_LIB.impl("int4_swiglu_experts", _int4_swiglu_experts, "CPU")
_LIB.impl("int4_swiglu_experts", lambda x, counts, weight, p_in, sz_in, p_out, sz_out, group_size:
          x.new_empty(x.shape[0], p_out.shape[1]), "Meta")


def int8_rows_traced(x_RI: torch.Tensor, q_ROI: torch.Tensor, s_RO: torch.Tensor) -> torch.Tensor:
    """``y_RO = (x_R . q_R^T) * s_R`` with row r's own int8 matrix ``q_ROI[r]``: what
    `torch._weight_int8pack_mm` computes (bf16 in, float32 sums, bf16 out), as
    `moelab.moe.traced.rows_matvec`, the reduction inductor compiles with the
    dequantisation inside its loop. At one row it streams the int8 weights ~1.7x as fast
    as the kernel (BENCHMARKS.md "Decode per weight format"). For compiled graphs."""
    return traced.rows_matvec(x_RI.to(KERNEL_DTYPE), q_ROI, s_RO).to(KERNEL_DTYPE)


@torch.compiler.assume_constant_result
def traced_int8_pays() -> bool:
    """Whether a compiled step runs its few-row int8 matmuls as traced reductions
    (`int8_rows_traced`), on an AVX512 build of torch, or keeps torch's int8 kernel. The
    reduction is fast where inductor vectorises its int8 loads: on AVX512 (Zen 5) it
    streamed the LM head at 1.7x the kernel's rate. On an AVX2 build (Zen 3) it measured
    4.8x (the [28096, 768] LM head, 33.6 against 7.0 ms at one row) to 12x ([2048, 768])
    *slower* than the kernel, and compiled int8 decode ran at 0.31x eager (BENCHMARKS.md
    "int4 x int8 on AVX2")."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def _traced_int8_experts(experts: QuantizedExperts, x_AD: torch.Tensor, counts_E: torch.Tensor,
                         weight_A: torch.Tensor) -> torch.Tensor:
    """`run_rows` with the int8 kernel's contract (bf16 GEMM inputs and outputs), traced:
    `moelab.moe.traced.expert_rows` over the int8 weights and their scales."""
    return traced.expert_rows(x_AD, counts_E, weight_A, experts.qweight("in"), experts.qweight("out"),
                              experts.activation, experts.scale("in"), experts.scale("out"), act_dtype=KERNEL_DTYPE)


# Rows up to which the traced int8 experts beat the per-expert kernel loop in a compiled step
# (the 207M benchmark model, 1 thread: faster at batch 1, 2 and 4; at batch 8, 16 rows,
# slower: 22.3 against 20.8 ms a step).
TRACED_INT8_MAX_ROWS = 8


def _compiled_forward(experts: QuantizedExperts, x_AD: torch.Tensor, counts_E: torch.Tensor,
                      weight_A: torch.Tensor) -> torch.Tensor:
    if experts.fmt.name == "int8" and x_AD.shape[0] <= TRACED_INT8_MAX_ROWS and traced_int8_pays():
        return _traced_int8_experts(experts, x_AD, counts_E, weight_A)
    if experts.fmt.name == "int8":
        return int8_expert_ffn(x_AD, experts.qweight("in"), experts.scale("in"), experts.qweight("out"),
                               experts.scale("out"), weight_A, counts_E, experts.activation)
    (p_in, sz_in), (p_out, sz_out) = experts.int4_kernel_weights("in"), experts.int4_kernel_weights("out")
    fits = fused_int4_fits(experts.d_model, experts.d_expert, experts.fmt.group_size, experts.activation)
    if fits:  # the op reads `vnni.enabled()` when it runs
        return torch.ops.moelab.int4_swiglu_experts(x_AD, counts_E, weight_A, p_in, sz_in, p_out, sz_out,
                                                    experts.fmt.group_size)
    return int4_expert_ffn(x_AD, p_in, sz_in, p_out, sz_out, weight_A, counts_E, experts.fmt.group_size,
                           experts.d_model, experts.activation)


def _backend(name: str, mm: ExpertMM, act_dtype: torch.dtype | None, summary: str) -> ExpertsBackend:
    """An `ExpertsBackend` over `run_quantized` (``act_dtype`` None: the input's dtype,
    promoted to float32)."""

    def dtype_for(x: torch.Tensor) -> torch.dtype:
        return act_dtype if act_dtype is not None else torch.promote_types(x.dtype, torch.float32)

    def forward(experts, x_AD, counts_E, weight_A):
        return run_quantized(experts, x_AD, counts_E, weight_A, mm, dtype_for(x_AD))

    def forward_gathered(experts, x_TD, token_idx_A, counts_E, weight_A):
        return run_quantized(experts, x_TD, counts_E, weight_A, mm, dtype_for(x_TD), token_idx_A)

    return ExpertsBackend(name, forward, lambda experts, x: True, summary, forward_gathered=forward_gathered)


INT8 = _backend("int8", _int8_mm, KERNEL_DTYPE,
                "int8 experts on CPU: torch._weight_int8pack_mm per expert, bf16 activations")
_INT4_LOOP = _backend("int4", _int4_mm, KERNEL_DTYPE, "")


def _int4_forward(experts, x, counts_E, weight_A, token_idx_A=None):
    """The fused layer (`run_int4_fused`) where it applies, else the per-expert loop."""
    if vnni.enabled() and vnni.fused_enabled() and fused_int4_fits(
            experts.d_model, experts.d_expert, experts.fmt.group_size, experts.activation):
        (p_in, sz_in), (p_out, sz_out) = experts.int4_kernel_weights("in"), experts.int4_kernel_weights("out")
        y = run_int4_fused(x, counts_E, weight_A, p_in, sz_in, p_out, sz_out, experts.fmt.group_size, token_idx_A)
        if y is not None:
            return y
    if token_idx_A is None:
        return _INT4_LOOP.forward(experts, x, counts_E, weight_A)
    return _INT4_LOOP.forward_gathered(experts, x, token_idx_A, counts_E, weight_A)


INT4 = ExpertsBackend(
    "int4", _int4_forward, lambda experts, x: True,
    "int4 experts on CPU: the layer in one call of moelab's int4 x int8 kernel where it runs (swiglu), "
    "else torch._weight_int4pack_mm_for_cpu per expert, bf16 activations",
    forward_gathered=lambda experts, x_TD, token_idx_A, counts_E, weight_A: _int4_forward(
        experts, x_TD, counts_E, weight_A, token_idx_A))
DEQUANT = _backend("dequant", _dequant_mm, None,
                   "quantised experts without a kernel: each used expert dequantised to float32 per call")
KERNEL_BACKENDS = {"int8": INT8, "int4": INT4}


# ---------------------------------------------------------------------------- the module

def _state_dict_with_portable(module: QuantizedExperts, state_dict: dict, prefix: str, local_metadata) -> None:
    """`state_dict` hook: the portable int4 buffers that were dropped for the kernel's copy."""
    for proj in ("in", "out"):
        name = module._name(proj)
        if getattr(module, f"{name}_qweight", None) is None and proj in module._int4_cache:
            for what, t in module.portable_int4(proj).items():
                state_dict[f"{prefix}{name}_{what}"] = t


def _restore_portable_buffers(module: QuantizedExperts, state_dict: dict, prefix: str, *args) -> None:
    """`load_state_dict` pre-hook: give dropped buffers a tensor again, so the state dict
    loads into them as usual (the next `int4_kernel_weights` packs and drops them again)."""
    for n, (shape, dtype) in module._portable_shapes.items():
        if module._buffers.get(n) is None and f"{prefix}{n}" in state_dict:
            module._buffers[n] = torch.zeros(shape, dtype=dtype)

class QuantizedExperts(nn.Module):
    """E routed experts with int8 or int4 weights (buffers: `state_dict` saves them).

    Per projection ``p`` (``gate_up_proj`` or ``up_proj``, and ``down_proj``):
      int8: ``p_qweight [E, O, I]`` int8, ``p_scale [E, O]`` bf16;
      int4: ``p_qweight [E, O, I/2]`` uint8 (`formats.pack_int4`), ``p_scale`` and
            ``p_zero [E, O, N]`` bf16.
    Build one with `from_experts`; `dequantized` gives the float reference.
    """

    def __init__(self, d_model: int, d_expert: int, num_experts: int, activation: str, fmt: QuantFormat,
                 impl: str = "grouped"):
        super().__init__()
        self.num_experts, self.d_model, self.d_expert = num_experts, d_model, d_expert
        self.activation, self.fmt, self.impl = activation, fmt, impl
        self.in_name = "gate_up_proj" if activation == "swiglu" else "up_proj"
        H = 2 * d_expert if activation == "swiglu" else d_expert
        self.H = H
        fmt.check_input_dim(d_model, f"{self.in_name} (d_model)")
        fmt.check_input_dim(d_expert, "down_proj (d_expert)")
        E = num_experts
        for name, (d_out, d_in) in ((self.in_name, (H, d_model)), ("down_proj", (d_model, d_expert))):
            if fmt.name == "int8":
                self.register_buffer(f"{name}_qweight", torch.zeros(E, d_out, d_in, dtype=torch.int8))
                self.register_buffer(f"{name}_scale", torch.zeros(E, d_out, dtype=formats.SCALE_DTYPE))
            else:
                N = d_in // fmt.group_size
                self.register_buffer(f"{name}_qweight", torch.zeros(E, d_out, d_in // 2, dtype=torch.uint8))
                self.register_buffer(f"{name}_scale", torch.zeros(E, d_out, N, dtype=formats.SCALE_DTYPE))
                self.register_buffer(f"{name}_zero", torch.zeros(E, d_out, N, dtype=formats.SCALE_DTYPE))
        # int4: the kernel's packed copy, made from the portable buffers (its layout is
        # blocked per CPU build, so it is not what we save). Once it exists the portable
        # buffers are dropped, so the weights are resident once (`int4_kernel_weights`);
        # `state_dict` rebuilds them from the kernel copy (`portable_int4`), and loading a
        # state_dict puts them back until the next packing.
        self._int4_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._portable_shapes = {n: (tuple(b.shape), b.dtype) for n, b in self._buffers.items()}
        self._register_state_dict_hook(_state_dict_with_portable)
        self._register_load_state_dict_pre_hook(_restore_portable_buffers, with_module=True)

    # -- construction and the reference

    @classmethod
    def from_experts(cls, experts: RoutedExperts, fmt: QuantFormat) -> QuantizedExperts:
        """Quantise `experts`' weights (float, any dtype) to `fmt` (RTN, `moelab.quant.formats`)."""
        q = cls(experts.d_model, experts.d_expert, experts.num_experts, experts.activation, fmt, experts.impl)
        q.to(experts.down_proj.device)
        with torch.no_grad():
            for name, w in ((q.in_name, experts.w_in), ("down_proj", experts.down_proj)):
                if fmt.name == "int8":
                    qw, scale = formats.quantize_int8(w)
                    getattr(q, f"{name}_qweight").copy_(qw)
                    getattr(q, f"{name}_scale").copy_(scale)
                else:
                    qw, scale, zero = formats.quantize_int4(w, fmt.group_size)
                    getattr(q, f"{name}_qweight").copy_(formats.pack_int4(qw))
                    getattr(q, f"{name}_scale").copy_(scale)
                    getattr(q, f"{name}_zero").copy_(zero)
        if fmt.name == "int4" and kernel_runs("int4"):
            for proj in ("in", "out"):
                q.int4_kernel_weights(proj)  # packed once, now rather than on the first token
        return q

    def _name(self, proj: str) -> str:
        return self.in_name if proj == "in" else "down_proj"

    def _portable(self, proj: str, what: str) -> torch.Tensor:
        """A saved buffer (``qweight``, ``scale``, ``zero``) of ``proj``; rebuilt from the
        int4 kernel's copy when it was dropped."""
        t = getattr(self, f"{self._name(proj)}_{what}")
        return t if t is not None else self.portable_int4(proj)[what]

    def qweight(self, proj: str) -> torch.Tensor:
        return self._portable(proj, "qweight")

    def scale(self, proj: str) -> torch.Tensor:
        return self._portable(proj, "scale")

    def dequantized_weight(self, proj: str, e: int | None = None) -> torch.Tensor:
        """The float32 weight of projection ``proj`` ("in"/"out"): ``[E, O, I]``, or expert e's ``[O, I]``."""
        pick = (lambda t: t) if e is None else (lambda t: t[e])
        qw, scale = pick(self.qweight(proj)), pick(self.scale(proj))
        if self.fmt.name == "int8":
            return formats.dequantize_int8(qw, scale)
        return formats.dequantize_int4(formats.unpack_int4(qw), scale, pick(self._portable(proj, "zero")))

    def dequantized(self) -> RoutedExperts:
        """A float32 `RoutedExperts` holding the dequantised weights: the reference."""
        ref = RoutedExperts(self.d_model, self.d_expert, self.num_experts, self.activation, impl=self.impl)
        ref.to(self.down_proj_scale.device if self.down_proj_scale is not None else "cpu")
        with torch.no_grad():
            ref.w_in.copy_(self.dequantized_weight("in"))
            ref.down_proj.copy_(self.dequantized_weight("out"))
        return ref

    # -- the int4 kernel's copy

    def int4_kernel_weights(self, proj: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(packed_EOP uint8, scales_and_zeros_ENO2 bf16)`` for the int4 CPU kernel.

        Made from the portable buffers when they are present (after construction or a
        `load_state_dict`; `torch._convert_weight_to_int4pack_for_cpu` takes the nibbles as
        int32 ``[O, I]``; P = I/2 bytes per row), which are then dropped: the kernel's copy
        is the one resident copy of the weights (a 768 x 2048 expert projection: 0.79 MB,
        not 1.6). `portable_int4` gives them back for saving and for the reference."""
        name = self._name(proj)
        qw, scale, zero = (getattr(self, f"{name}_{s}") for s in ("qweight", "scale", "zero"))
        if qw is None:
            return self._int4_cache[proj]
        # innerKTiles is ignored by the CPU packing (same result for 1, 2, 4, 8: checked).
        packed = torch.stack([kernel_pack_int4(qw[e]) for e in range(self.num_experts)])
        sz = torch.stack([int4_scales_and_zeros(scale[e], zero[e]) for e in range(self.num_experts)])
        self._int4_cache[proj] = (packed, sz)
        for what in ("qweight", "scale", "zero"):
            self._buffers[f"{name}_{what}"] = None  # a None buffer: not in state_dict, no memory
        return packed, sz

    def portable_int4(self, proj: str) -> dict[str, torch.Tensor]:
        """The saved form of an int4 projection (``qweight`` nibbles ``[E, O, I/2]``,
        ``scale`` and ``zero`` ``[E, O, N]``) rebuilt from the kernel's copy
        (`portable_from_kernel_int4`, expert by expert)."""
        packed, sz = self._int4_cache[proj]
        d_out, d_in = (self.d_model, self.d_expert) if proj == "out" else (self.H, self.d_model)
        per = [portable_from_kernel_int4(packed[e], sz[e], self.fmt.group_size, d_in, d_out)
               for e in range(self.num_experts)]
        return {k: torch.stack([p[k] for p in per]) for k in ("qweight", "scale", "zero")}

    # -- accounting

    def nbytes(self) -> int:
        """Bytes of what `state_dict` saves (the portable buffers, resident or not)."""
        return sum(math.prod(shape) * dtype.itemsize for shape, dtype in self._portable_shapes.values())

    def resident_nbytes(self) -> int:
        """Bytes held in memory now: the buffers present and the kernel's copies."""
        held = sum(b.numel() * b.element_size() for b in self.buffers())
        return held + sum(t.numel() * t.element_size() for ts in self._int4_cache.values() for t in ts)

    def kernel_nbytes(self) -> int:
        """Resident bytes beyond the saved ones (int4: what the kernel's layout adds; int8: 0)."""
        return self.resident_nbytes() - self.nbytes()

    # -- the experts protocol

    def backend(self, x: torch.Tensor) -> ExpertsBackend:
        """The kernel of this format where it runs on this input, else `DEQUANT`."""
        name = self.fmt.name
        if x.device.type != "cpu":
            _say_once(f"device-{x.device.type}", "quantised experts on %s: no kernel here, each used "
                      "expert is dequantised per call", x.device.type)
            return DEQUANT
        if not kernel_runs(name):
            return DEQUANT
        return KERNEL_BACKENDS[name]

    @property
    def compilable(self) -> bool:
        """Whether a `torch.compile`d decode step can run these experts: on CPU, with the
        format's kernel (the dequantise fallback has no compiled op)."""
        on_cpu = all(b.device.type == "cpu" for b in self.buffers()) and all(
            t.device.type == "cpu" for ts in self._int4_cache.values() for t in ts)
        return on_cpu and kernel_runs(self.fmt.name)

    def forward(self, x_AD: torch.Tensor, tokens_per_expert_E: torch.Tensor, weight_A: torch.Tensor) -> torch.Tensor:
        """``y_A = w_A * expert_e(x_A)`` for rows grouped by expert, as `RoutedExperts` does."""
        if torch.compiler.is_compiling():
            return _compiled_forward(self, x_AD, tokens_per_expert_E, weight_A)
        return self.backend(x_AD).forward(self, x_AD, tokens_per_expert_E, weight_A)

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        raise ConfigError("quantised experts have no parameters to initialise; quantise initialised float experts")

    def extra_repr(self) -> str:
        fmt = self.fmt.name + (f", group_size={self.fmt.group_size}" if self.fmt.name == "int4" else "")
        return (f"num_experts={self.num_experts}, d_model={self.d_model}, d_expert={self.d_expert}, "
                f"activation={self.activation}, format={fmt}")
