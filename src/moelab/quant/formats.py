"""Quantisation formats: round-to-nearest (RTN) int8 and int4 weights, as pure functions.

Legend: E experts (any leading dims), O output rows, I input dim (the dim a GEMM sums
over), N = I / group_size groups per row (int4), G the group size.

Both formats store their scales (and int4 its zero points) in **bf16**: torch's CPU
kernels (`torch._weight_int8pack_mm`, `torch._weight_int4pack_mm_for_cpu`) take them in
the activations' dtype, and the quantised experts feed them bf16 activations. The
integers are rounded against the bf16-rounded scales, so what `dequantize_*` returns is
exactly the weight the kernel multiplies by (the reference and the kernel agree).

int8, per output channel, symmetric:
    scale_EO = max_i |w_EOI| / 127          (0 for an all-zero row: q = 0, w = 0 exactly)
    q_EOI    = clamp(round(w / scale), -127, 127)   int8
    w       ~= q * scale                    |w - q * scale| <= scale / 2

int4, per group of G inputs of a row, asymmetric, in the form torch's int4 CPU kernel
computes (verified against torch 2.13: it maps a nibble q to ``(q - 8) * scale + zero``):
    scale_EON = (max - min) / 15            (0 for a constant group: q = 8, w = zero)
    zero_EON  = min + 8 * scale             (the value of the middle nibble, a float)
    q_EOI     = clamp(round((w - zero) / scale) + 8, 0, 15)
    w        ~= (q - 8) * scale + zero      (= q * scale + min: the textbook form)
    |w - dq| <= scale / 2 + ulp(zero) / 2   (the second term: zero is stored in bf16, so
                                             the grid can be shifted by its rounding; for
                                             weights centred on 0, |zero| ~ scale/2 and the
                                             term is ~scale / 512)

int4 values are kept two to a byte in a portable nibble packing (`pack_int4`: even input
column in the low nibble, odd in the high one); the kernel's own packed layout is
blocked per CPU build, so it is made from this one at load time (`moelab.quant.experts`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moelab.errors import ConfigError

FORMATS = ("int8", "int4")
# The group sizes torch's int4 CPU kernel takes (it also takes 256), within 32..128.
INT4_GROUP_SIZES = (32, 64, 128)
SCALE_DTYPE = torch.bfloat16


@dataclass(frozen=True, kw_only=True)
class QuantFormat:
    """How expert weights are quantised: ``name`` "int8" or "int4"; ``group_size`` (int4
    only) the number of consecutive inputs sharing one scale and zero point."""

    name: str = "int8"
    group_size: int = 128

    def __post_init__(self) -> None:
        if self.name not in FORMATS:
            raise ConfigError(f"QuantFormat.name={self.name!r} is not a format; allowed: {', '.join(FORMATS)}")
        g = self.group_size
        if not isinstance(g, int) or isinstance(g, bool) or g not in INT4_GROUP_SIZES:
            raise ConfigError(
                f"QuantFormat.group_size={g!r} is not allowed; allowed: {', '.join(map(str, INT4_GROUP_SIZES))} "
                "(the group sizes torch's int4 CPU kernel takes)"
            )

    @property
    def bits(self) -> int:
        return 8 if self.name == "int8" else 4

    def check_input_dim(self, dim: int, where: str) -> None:
        """Refuse an int4 group size that does not divide the input dim ``dim`` of `where`."""
        if self.name == "int4" and dim % self.group_size:
            fits = [g for g in INT4_GROUP_SIZES if dim % g == 0]
            raise ConfigError(
                f"QuantFormat.group_size={self.group_size} does not divide the input dim of {where} ({dim}); "
                f"allowed: a group size among {', '.join(map(str, INT4_GROUP_SIZES))} that divides {dim}"
                + (f" ({', '.join(map(str, fits))})" if fits else " (none does: use int8)")
            )


# ---------------------------------------------------------------------------- int8


def quantize_int8(w_EOI: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q_EOI int8, scale_EO bf16)``: per-output-channel symmetric RTN (module docstring)."""
    w = w_EOI.detach().float()
    scale_EO = (w.abs().amax(-1) / 127).to(SCALE_DTYPE)
    s = scale_EO.float().unsqueeze(-1)
    # Divide only where the scale is positive: an all-zero row gets q = 0 (and w = 0).
    q = torch.where(s > 0, w / torch.where(s > 0, s, 1.0), 0.0)
    return q.round_().clamp_(-127, 127).to(torch.int8), scale_EO


def dequantize_int8(q_EOI: torch.Tensor, scale_EO: torch.Tensor) -> torch.Tensor:
    """``q * scale`` in float32."""
    return q_EOI.float() * scale_EO.float().unsqueeze(-1)


# ---------------------------------------------------------------------------- int4


def quantize_int4(w_EOI: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q_EOI uint8 in [0, 15], scale_EON bf16, zero_EON bf16)``: group-wise asymmetric
    RTN along the input dim (module docstring). ``group_size`` must divide I."""
    *lead, d_in = w_EOI.shape
    if d_in % group_size:
        raise ConfigError(f"quantize_int4: group_size={group_size} does not divide the input dim {d_in}")
    w_EONG = w_EOI.detach().float().reshape(*lead, d_in // group_size, group_size)
    lo_EON, hi_EON = w_EONG.amin(-1), w_EONG.amax(-1)
    scale_EON = ((hi_EON - lo_EON) / 15).to(SCALE_DTYPE)
    s = scale_EON.float()
    zero_EON = (lo_EON + 8 * s).to(SCALE_DTYPE)
    s, z = s.unsqueeze(-1), zero_EON.float().unsqueeze(-1)
    q = torch.where(s > 0, (w_EONG - z) / torch.where(s > 0, s, 1.0), 0.0).round_().add_(8).clamp_(0, 15)
    return q.to(torch.uint8).reshape(*lead, d_in), scale_EON, zero_EON


def dequantize_int4(q_EOI: torch.Tensor, scale_EON: torch.Tensor, zero_EON: torch.Tensor) -> torch.Tensor:
    """``(q - 8) * scale + zero`` in float32, each group's scale over its G inputs."""
    *lead, d_in = q_EOI.shape
    N = scale_EON.shape[-1]
    q_EONG = q_EOI.float().reshape(*lead, N, d_in // N)
    w = (q_EONG - 8) * scale_EON.float().unsqueeze(-1) + zero_EON.float().unsqueeze(-1)
    return w.reshape(*lead, d_in)


def pack_int4(q_EOI: torch.Tensor) -> torch.Tensor:
    """Two nibbles a byte, ``[..., I] -> [..., I/2]`` uint8: column 2i low, 2i+1 high."""
    q = q_EOI.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_int4`: ``[..., I/2] -> [..., I]`` uint8 in [0, 15]."""
    lo, hi = packed & 0xF, packed >> 4
    return torch.stack([lo, hi], dim=-1).flatten(-2)
