"""int4 weights x int8 activations: our own CPU kernel for few rows (W4A8), on AVX512-VNNI
(`int4_vnni.c`) or, on CPUs without AVX512, AVX2 (`int4_avx2.c`).

Legend: R rows, O / I a matrix's output / input dim, N = I / G groups per row, G the int4
group size, P = I / 2 packed bytes per row.

Why: torch's int4 CPU kernel (`torch._weight_int4pack_mm_for_cpu`) converts every nibble
to float and multiplies it by a bf16 activation; at one row that costs more than reading
the weights (~29G weights/s on one Zen 5 core, BENCHMARKS.md "Decode per weight format"),
so int4 decoded slower than int8, and at 0.67x llama.cpp's q4_0. llama.cpp instead rounds
the activations to int8 per block of 32 and sums integer products with VNNI. `int4_vnni.c`
does that on torch's own blocked packing (the kernel's copy that `QuantizedExperts`,
`QuantizedLinear` and the offload slots already hold), so the weights stay resident once
and nothing else changes; `moelab.quant.experts.int4_rows_mm` calls it for few rows.

The numbers it computes (`reference_w4a8_mm` is the slow, obviously correct reference):
the dequantised int4 weights times the activations rounded to int8 per block of 32
inputs (symmetric, scale max|x| / 127, round half to even), summed in float32 and rounded
once to bf16, as torch's kernel rounds its output. The activation rounding adds a
relative error of ~0.3% per product (torch's kernel rounds x to bf16 instead: ~0.2%),
small beside int4's own ~10% weight error; BENCHMARKS.md measures what it does to the
loss ("int4 x int8 (VNNI)").

When it runs (else torch's kernel, as before): the CPU has AVX512 F/BW/VL/VNNI/VBMI
(`REQUIRED_FLAGS`: `int4_vnni.c`, vpdpbusd) or else AVX2 and FMA (`int4_avx2.c`,
vpmaddubsw, as llama.cpp's AVX2 q4_0; `VARIANTS`), torch packs int4 in the row blocks
that variant reads (its AVX512 builds 64, its AVX2 builds 32), a C compiler builds it
(once; cached by the source's and compiler's hash in ``$MOELAB_KERNEL_DIR``, else
``~/.cache/moelab/kernels``), the kernel matches the reference on a probe matrix, and
``MOELAB_INT4_VNNI`` is not ``0`` (read once, at the first int4 matrix). A CPU with AVX512
but without VNNI/VBMI (Skylake-X) gets torch's kernel: torch packs 64-row blocks there,
which the AVX2 variant does not read. Why it does not run is said once in the log. `disabled()` turns it off within a block (for side-by-side
benchmarks in one process).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from moelab.hardware import cpu_flags
from moelab.quant import formats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    """One build of the kernel: its source, the CPU flags it needs, its compiler flags, and
    the rows per block of the torch int4 packing it reads (torch's AVX512 builds pack 64,
    its AVX2 builds 32: `moelab.quant.experts.int4_pack_block`)."""

    name: str
    source: Path
    flags: tuple[str, ...]
    cflags: tuple[str, ...]
    block: int


_HERE = Path(__file__).parent
# -fno-trapping-math: lets the compiler vectorise int4_shared.h's portable activation loop
# (no FP exception flags are read here)
_COMMON_CFLAGS = ("-O3", "-fno-trapping-math", "-shared", "-fPIC", "-fopenmp")
HEADER = _HERE / "int4_shared.h"  # the layer's experts in one call, included by both sources
# In order of preference: the first whose flags the CPU has is built.
VARIANTS = (
    Variant("avx512-vnni", _HERE / "int4_vnni.c", ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512vbmi"),
            ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx512vbmi"), 64),
    Variant("avx2", _HERE / "int4_avx2.c", ("avx2", "fma"), ("-mavx2", "-mfma"), 32),
)
REQUIRED_FLAGS = VARIANTS[0].flags  # the AVX512 variant's
ACT_BLOCK = 32  # inputs per activation scale

_state: dict[str, object] = {}
_lock = threading.Lock()
_enabled = [True]
_fused = [True]


def kernel_dir() -> Path:
    """Where built kernels are cached: ``$MOELAB_KERNEL_DIR``, else ``~/.cache/moelab/kernels``."""
    env = os.environ.get("MOELAB_KERNEL_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moelab" / "kernels"


def _compiler() -> list[str] | None:
    """``$CC`` (which may carry flags, as in ``CC="gcc -m64"``), else ``cc``, if it exists."""
    cc = shlex.split(os.environ.get("CC", "cc")) or ["cc"]
    found = shutil.which(cc[0])
    return [found, *cc[1:]] if found else None


def variant() -> Variant | None:
    """The kernel variant this CPU runs (the first of `VARIANTS` whose flags it has), or None."""
    if "variant" not in _state:  # once per process (fits() asks on every int4 matrix)
        have = cpu_flags()
        _state["variant"] = next((v for v in VARIANTS if all(f in have for f in v.flags)), None)
    return _state["variant"]  # type: ignore[return-value]


def out_block() -> int | None:
    """Output rows per packing block the kernel built here reads (None: no variant here)."""
    v = variant()
    return v.block if v else None


def variant_name() -> str:
    v = variant()
    return v.name if v else "no"


def _build(cc: list[str], v: Variant) -> Path:
    """The built shared library of variant ``v`` (built now unless cached); RuntimeError says why not."""
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30).stdout.split("\n")[0]
    flags = (*_COMMON_CFLAGS, *v.cflags)
    key = hashlib.sha256(v.source.read_bytes() + HEADER.read_bytes() + " ".join((*cc, *flags, version)).encode())
    key = key.hexdigest()[:16]
    out_dir = kernel_dir()
    out = out_dir / f"{v.source.stem}-{key}.so"
    if out.exists():
        return out
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError:  # an unwritable cache (a read-only home): build for this process only
        out_dir = Path(tempfile.gettempdir()) / f"moelab-kernels-{os.getuid()}"
        out_dir.mkdir(parents=True, exist_ok=True)
        out = out_dir / out.name
        if out.exists():
            return out
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    res = subprocess.run([*cc, *flags, "-o", str(tmp), str(v.source)], capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        tmp.unlink(missing_ok=True)
        first = (res.stderr.strip().splitlines() or ["(no output)"])[0]
        raise RuntimeError(f"{' '.join(cc)} could not build {v.source.name}: {first}")
    os.replace(tmp, out)  # atomic: a concurrent process sees the whole file or none
    return out


def _function():
    """The loaded C function, or None (the reason kept in ``_state["why"]``)."""
    with _lock:  # once per process, even when the serving threads ask at once
        if "fn" not in _state:
            _load()
    return _state["fn"]


def _load() -> None:
    """Pick the variant, check the compiler, build (or find the cached build) and load it."""
    fn, why = None, None
    v = variant()
    cc = _compiler()
    if v is None:
        have = cpu_flags()
        why = "the CPU lacks " + " and ".join(
            f"{', '.join(f for f in w.flags if f not in have)} (for {w.source.name})" for w in VARIANTS)
    elif cc is None:
        why = f"no C compiler ({os.environ.get('CC', 'cc')} not found; set CC)"
    else:
        try:
            lib = ctypes.CDLL(str(_build(cc, v)))
            fn = lib.moelab_w4a8_mm
            fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 5
            fn.restype = ctypes.c_int
            ffn = lib.moelab_w4a8_swiglu_experts
            ffn.argtypes = [ctypes.c_void_p] * 9 + [ctypes.c_int] * 9
            ffn.restype = ctypes.c_int
            _state["experts"] = ffn
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            why = str(e)
    _state["fn"], _state["why"] = fn, why


def unavailable_reason() -> str | None:
    """Why the kernel cannot be built or loaded here (None: it can). Not the probe."""
    if os.environ.get("MOELAB_INT4_VNNI") == "0":
        return "MOELAB_INT4_VNNI=0"
    _function()
    return _state["why"]  # type: ignore[return-value]


def enabled() -> bool:
    """Whether calls may use the kernel now: not inside `disabled()`. (``MOELAB_INT4_VNNI=0``
    is read once, by the probe: `unavailable_reason`.)"""
    return _enabled[0]


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within the block, int4 matrices run on torch's kernel (a side-by-side switch)."""
    before = _enabled[0]
    _enabled[0] = False
    try:
        yield
    finally:
        _enabled[0] = before


def fused_enabled() -> bool:
    """Whether an MoE layer's int4 experts may run in one call (`w4a8_swiglu_experts`) now:
    not inside `unfused()`."""
    return _fused[0]


@contextlib.contextmanager
def unfused() -> Iterator[None]:
    """Within the block, int4 experts run one `w4a8_mm` per matrix from Python, as before
    the one-call layer (a side-by-side switch; read when the call runs, compiled or not)."""
    before = _fused[0]
    _fused[0] = False
    try:
        yield
    finally:
        _fused[0] = before


def fits(rows: int, d_out: int, d_in: int, group_size: int) -> bool:
    """Whether the kernel built here takes these shapes (whole packing blocks of output
    rows, `out_block`; groups of whole 32-input blocks)."""
    block = out_block()
    return block is not None and rows >= 1 and d_out >= block and d_out % block == 0 \
        and group_size % ACT_BLOCK == 0 and d_in % group_size == 0


def w4a8_mm(x_RI: torch.Tensor, packed_OP: torch.Tensor, group_size: int, sz_NO2: torch.Tensor) -> torch.Tensor:
    """``x W^T`` (bf16 ``[R, O]``) by the VNNI kernel: W in torch's blocked int4 packing
    (``packed_OP``, with its ``[N, O, 2]`` bf16 scales and zeros), x bf16 rounded to int8
    per block of 32. The inputs are checked here; `moelab.quant.experts.int4_rows_mm`,
    which checks them before, calls `w4a8_mm_unchecked` (a decode step makes ~70 calls)."""
    if _function() is None:
        raise RuntimeError(f"the int4 x int8 kernel is not available: {_state['why']}")
    R, I = x_RI.shape  # noqa: E741
    O = packed_OP.shape[0]  # noqa: E741
    if x_RI.dtype != torch.bfloat16 or packed_OP.dtype != torch.uint8 or sz_NO2.dtype != torch.bfloat16:
        raise TypeError(f"w4a8_mm takes bf16 x, uint8 packed weights, bf16 scales (got {x_RI.dtype}, "
                        f"{packed_OP.dtype}, {sz_NO2.dtype})")
    if packed_OP.shape[1] * 2 != I or tuple(sz_NO2.shape) != (I // group_size, O, 2) or not fits(R, O, I, group_size):
        raise ValueError(f"w4a8_mm: shapes x {tuple(x_RI.shape)}, packed {tuple(packed_OP.shape)}, scales "
                         f"{tuple(sz_NO2.shape)}, group size {group_size} do not fit the kernel")
    return w4a8_mm_unchecked(x_RI, packed_OP, group_size, sz_NO2)


def w4a8_mm_unchecked(x_RI: torch.Tensor, packed_OP: torch.Tensor, group_size: int,
                      sz_NO2: torch.Tensor) -> torch.Tensor:
    """`w4a8_mm` for inputs already checked (dtypes, `fits`) and a kernel that loaded."""
    x, packed, sz = x_RI.contiguous(), packed_OP.contiguous(), sz_NO2.contiguous()
    R, I = x.shape  # noqa: E741
    O = packed.shape[0]  # noqa: E741
    y = torch.empty(R, O, dtype=torch.bfloat16)
    rc = _state["fn"](x.data_ptr(), packed.data_ptr(), sz.data_ptr(), y.data_ptr(), R, O, I, group_size,
                      torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"moelab_w4a8_mm failed (code {rc}: {'shapes' if rc == 1 else 'out of memory'})")
    return y


def w4a8_swiglu_experts(x_XD: torch.Tensor, token_idx_A: torch.Tensor | None, counts_E: torch.Tensor,
                        weight_A: torch.Tensor, p_in: torch.Tensor, sz_in: torch.Tensor, p_out: torch.Tensor,
                        sz_out: torch.Tensor, group_size: int, *, combine: bool, max_rows: int) -> torch.Tensor | None:
    """One MoE layer's swiglu experts on the kernel in one call: for rows grouped by expert
    (``counts_E``; assignment a reads ``x_XD[token_idx_A[a]]``, or row a without an index),
    ``y_a = w_a * down(silu(gate) * up)`` with both projections `w4a8_mm` (``p_in [E, 2F,
    D/2]``, ``p_out [E, D, F/2]`` in torch's blocked int4 packing, ``sz_*`` their ``[E, N,
    O, 2]`` bf16 scales and zeros) and the activation in float32 rounded to bf16, as
    `moelab.quant.experts.run_rows` computes with `w4a8_mm` per expert (the reference).
    ``exp`` is the kernel's own polynomial, so an activation can differ from torch's by a
    bf16 rounding.

    Returns float32 ``[A, D]`` (``combine`` False) or ``[X, D]`` with each token's rows
    summed in assignment order (True), or None when an expert has more than ``max_rows``
    rows (where the dense path is faster). Dtypes are checked here (TypeError), shapes by
    the kernel (`experts_fit` says which fit; RuntimeError), bad counts or indices too
    (ValueError)."""
    if _function() is None:
        raise RuntimeError(f"the int4 x int8 kernel is not available: {_state['why']}")
    if x_XD.dtype != torch.bfloat16 or p_in.dtype != torch.uint8 or p_out.dtype != torch.uint8 \
            or sz_in.dtype != torch.bfloat16 or sz_out.dtype != torch.bfloat16:
        raise TypeError(f"w4a8_swiglu_experts takes bf16 x, uint8 packed weights, bf16 scales (got {x_XD.dtype}, "
                        f"{p_in.dtype}/{p_out.dtype}, {sz_in.dtype}/{sz_out.dtype})")
    x = x_XD.contiguous()
    X, D = x.shape
    A, F = weight_A.shape[0], p_out.shape[2] * 2
    idx = None if token_idx_A is None else token_idx_A.to(torch.int64).contiguous()
    counts = counts_E.to(torch.int64).contiguous()
    w = weight_A.float().contiguous()
    weights = [t.contiguous() for t in (p_in, sz_in, p_out, sz_out)]
    out = torch.empty(X if combine else A, D, dtype=torch.float32)
    rc = _state["experts"](x.data_ptr(), 0 if idx is None else idx.data_ptr(), counts.data_ptr(), w.data_ptr(),
                           *(t.data_ptr() for t in weights), out.data_ptr(), X, A, counts.shape[0], D, F,
                           group_size, int(combine), max_rows, torch.get_num_threads())
    if rc == 4:
        return None
    if rc == 3:
        raise ValueError(f"w4a8_swiglu_experts: counts {counts.tolist()} (sum != {A} rows, or negative) or a "
                         f"token index outside [0, {X}) do not fit")
    if rc != 0:
        raise RuntimeError(f"moelab_w4a8_swiglu_experts failed (code {rc}: {'shapes' if rc == 1 else 'out of memory'})")
    return out


def experts_fit(d_model: int, d_expert: int, group_size: int) -> bool:
    """Whether `w4a8_swiglu_experts` takes experts of these shapes (both projections `fits`)."""
    return fits(1, 2 * d_expert, d_model, group_size) and fits(1, d_model, d_expert, group_size)


# ---------------------------------------------------------------------------- the reference


def quantize_activations(x_RI: torch.Tensor) -> torch.Tensor:
    """The activations the kernel multiplies, dequantised: float32 ``x`` rounded to int8
    per block of 32 inputs (``s = max|x| / 127``, ``round(x * (127 / max|x|))``, half to
    even; an all-zero block stays zero), times ``s``."""
    R, I = x_RI.shape  # noqa: E741
    xb = x_RI.float().reshape(R, I // ACT_BLOCK, ACT_BLOCK)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return (torch.round(xb * inv) * (amax / 127.0)).reshape(R, I)


def reference_w4a8_mm(x_RI: torch.Tensor, q_OI: torch.Tensor, scale_ON: torch.Tensor,
                      zero_ON: torch.Tensor) -> torch.Tensor:
    """What `w4a8_mm` computes, slowly and plainly, from the portable int4 form (nibbles
    ``q_OI`` in [0, 15], ``scale_ON``/``zero_ON``): the rounded activations times the
    dequantised weights, summed in float64, rounded to bf16."""
    w_OI = formats.dequantize_int4(q_OI, scale_ON, zero_ON)
    return (quantize_activations(x_RI).double() @ w_OI.double().t()).to(torch.bfloat16)
