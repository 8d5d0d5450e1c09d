"""MXFP4 (OCP Microscaling, FP4 E2M1 elements, E8M0 block scales): gpt-oss's expert
weights on disk, dequantised at import.

Legend: E experts, O output rows, I inputs, G = I / 32 blocks per row.

A published gpt-oss checkpoint stores each stacked expert projection as two tensors
(config.json: ``"quantization_config": {"quant_method": "mxfp4", ...}``):

    <proj>_blocks  uint8 [E, O, G, 16]   32 FP4 values per block, two per byte, the even
                                         element in the low nibble
    <proj>_scales  uint8 [E, O, G]       one power-of-two scale per block, E8M0: 2^(s - 127)

with O the columns of transformers' ``x @ W`` operand (``gate_up_proj [E, D, 2F]``: O = 2F,
interleaved gate/up; I = D). An FP4 E2M1 nibble is a sign bit and a 3-bit magnitude
index into {0, 0.5, 1, 1.5, 2, 3, 4, 6}. Dequantised: ``w[e, o, 32 g + j] = fp4(nibble) *
2^(scale[e, o, g] - 127)``, returned ``[E, O, I]`` (transformers'
`integrations.mxfp4.convert_moe_packed_tensors` returns its transpose, the ``x @ W``
operand; tests/hf/test_mxfp4.py checks the two agree bit for bit).

`quantize_mxfp4` is the writer the tests use to make MXFP4 checkpoints (no Hub here): per
block, the scale is the power of two that puts the block's largest magnitude in [4, 8)
(``floor(log2 amax) - 2``, the OCP spec's rule with E2M1's emax = 2), and each value is
rounded to the nearest FP4 value (ties to the even code, values past 6 saturate).
"""

from __future__ import annotations

import torch

from moelab.errors import CheckpointError

BLOCK = 32  # elements per scale
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
SCALE_BIAS = 127


def dequantize_mxfp4(blocks_EOGB: torch.Tensor, scales_EOG: torch.Tensor, *, name: str = "mxfp4") -> torch.Tensor:
    """float32 ``[E, O, I]`` from MXFP4 ``blocks [E, O, G, 16]`` and ``scales [E, O, G]`` (module
    docstring); `name` is the tensor named in a shape or dtype error."""
    if blocks_EOGB.dtype != torch.uint8 or scales_EOG.dtype != torch.uint8:
        raise CheckpointError(f"{name}: MXFP4 blocks and scales must be uint8, got {blocks_EOGB.dtype} and "
                              f"{scales_EOG.dtype}")
    if blocks_EOGB.dim() < 2 or blocks_EOGB.shape[-1] != BLOCK // 2 or tuple(blocks_EOGB.shape[:-1]) != tuple(
            scales_EOG.shape):
        raise CheckpointError(f"{name}: MXFP4 blocks {tuple(blocks_EOGB.shape)} and scales "
                              f"{tuple(scales_EOG.shape)} do not fit (expected [..., G, 16] and [..., G])")
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    lead = blocks_EOGB.shape[:-2]
    G = blocks_EOGB.shape[-2]
    out = torch.empty(*lead, G * BLOCK, dtype=torch.float32)
    # 4096 rows at a time: the nibble tables of a whole gpt-oss-120b
    # projection would be several times its float32 size on top of it.
    blocks_RGB, scales_RG, out_RI = blocks_EOGB.reshape(-1, G, BLOCK // 2), scales_EOG.reshape(-1, G), out.view(-1, G * BLOCK)
    for r0 in range(0, blocks_RGB.shape[0], 4096):
        blk, sc = blocks_RGB[r0 : r0 + 4096], scales_RG[r0 : r0 + 4096]
        vals = torch.stack([lut[(blk & 0x0F).long()], lut[(blk >> 4).long()]], dim=-1).flatten(-2)  # even: low nibble
        out_RI[r0 : r0 + 4096] = torch.ldexp(vals, sc.to(torch.int32).sub(SCALE_BIAS).unsqueeze(-1)).flatten(-2)
    return out


def _fp4_codes(x: torch.Tensor) -> torch.Tensor:
    """The nearest FP4 E2M1 code (0-15) of each value (already divided by its scale)."""
    mags = torch.tensor(FP4_VALUES[:8])
    a = x.abs().clamp(max=6.0)
    # Nearest magnitude; a tie goes to the even index (its mantissa bit is 0).
    d = (a.unsqueeze(-1) - mags).abs()
    best = d.min(-1, keepdim=True).values
    idx = torch.where(d == best, torch.arange(8), 99)
    even_first = torch.where(idx % 2 == 0, idx, idx + 100)
    code = even_first.min(-1).values % 100
    return (code | torch.where((x < 0) & (code > 0), 8, 0)).to(torch.uint8)  # zero is +0


def quantize_mxfp4(w_EOI: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(blocks [E, O, G, 16] uint8, scales [E, O, G] uint8)`` of float ``w [E, O, I]``, I a
    multiple of 32 (module docstring)."""
    *lead, I = w_EOI.shape  # noqa: E741 - the legend's name
    if I % BLOCK:
        raise ValueError(f"quantize_mxfp4: the input dim {I} is not a multiple of {BLOCK}")
    x = w_EOI.float().reshape(*lead, I // BLOCK, BLOCK)
    amax = x.abs().amax(-1)
    e = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp(min=2.0**-126))) - 2, torch.full_like(amax, -127))
    e = e.clamp(-SCALE_BIAS, 127)
    codes = _fp4_codes(x / torch.ldexp(torch.ones_like(e), e.to(torch.int32)).unsqueeze(-1))
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks.to(torch.uint8), (e + SCALE_BIAS).to(torch.uint8)
