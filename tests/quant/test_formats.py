"""The RTN formats (`moelab.quant.formats`): error bounds, exact grids, packing, config."""

from __future__ import annotations

import pytest
import torch

from moelab.errors import ConfigError
from moelab.quant import formats
from moelab.quant.formats import QuantFormat


def _weights(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * 0.05
    w[0, 0] = 0.0  # an all-zero row (int8) and a constant group (int4) must not divide by zero
    w[1, 1, :64] = 0.3
    return w


def _half_ulp_bf16(z: torch.Tensor) -> torch.Tensor:
    """Half a bf16 ulp at |z| (8 significant bits: z = m 2^e, m in [0.5, 1) -> ulp 2^(e-8))."""
    _, e = torch.frexp(z.float())
    return torch.where(z == 0, 0.0, torch.ldexp(torch.ones_like(z, dtype=torch.float32), e - 9))


def test_int8_error_within_half_scale_per_channel():
    w = _weights(3, 48, 96)
    q, scale = formats.quantize_int8(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.bfloat16 and scale.shape == (3, 48)
    assert int(q.abs().max()) <= 127
    err = (w - formats.dequantize_int8(q, scale)).abs()
    s = scale.float().unsqueeze(-1)
    assert bool((err <= s / 2 * (1 + 1e-6) + 1e-9).all())
    assert float(err[0, 0].max()) == 0.0 and float(scale[0, 0]) == 0.0  # the zero row: exact


def test_int8_exact_on_grid():
    g = torch.Generator().manual_seed(1)
    q0 = torch.randint(-127, 128, (2, 16, 64), generator=g, dtype=torch.int8)
    q0[..., 0] = 127  # the row maximum sits on the grid's end, so the scale is recovered exactly
    s0 = (torch.rand(2, 16, generator=g) * 0.01 + 1e-3).to(torch.bfloat16)
    w = formats.dequantize_int8(q0, s0)
    q, s = formats.quantize_int8(w)
    assert torch.equal(q, q0) and torch.equal(s, s0)
    assert torch.equal(formats.dequantize_int8(q, s), w)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_error_within_half_scale_per_group(group_size):
    w = _weights(3, 32, 256)
    q, scale, zero = formats.quantize_int4(w, group_size)
    N = 256 // group_size
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and scale.shape == zero.shape == (3, 32, N)
    err_EONG = (w - formats.dequantize_int4(q, scale, zero)).abs().reshape(3, 32, N, group_size)
    # scale/2 from rounding, plus half a bf16 ulp of the zero point (stored in bf16 for the
    # kernel, which can shift the grid's ends by that much: see the formats docstring).
    bound_EON = scale.float() / 2 + _half_ulp_bf16(zero)
    assert bool((err_EONG <= bound_EON.unsqueeze(-1) * (1 + 1e-5) + 1e-9).all())
    # The rounding term dominates for weights centred on zero: the zero term stays small.
    assert float((_half_ulp_bf16(zero) / scale.float().clamp_min(1e-12)).median()) < 0.05


def test_int4_exact_on_grid():
    g = torch.Generator().manual_seed(2)
    G = 32
    q0 = torch.randint(0, 16, (2, 16, 128), generator=g, dtype=torch.uint8)
    q0[..., 0::G], q0[..., 1::G] = 0, 15  # every group spans the whole grid
    s0 = (torch.rand(2, 16, 4, generator=g) * 0.01 + 1e-3).to(torch.bfloat16)
    z0 = (torch.randn(2, 16, 4, generator=g) * 0.01).to(torch.bfloat16)
    w = formats.dequantize_int4(q0, s0, z0)
    q, s, z = formats.quantize_int4(w, G)
    assert torch.equal(q, q0) and torch.equal(s, s0) and torch.equal(z, z0)
    assert torch.equal(formats.dequantize_int4(q, s, z), w)


def test_int4_pack_round_trip():
    q = torch.randint(0, 16, (3, 5, 64), dtype=torch.uint8)
    packed = formats.pack_int4(q)
    assert packed.shape == (3, 5, 32) and packed.dtype == torch.uint8
    assert torch.equal(packed[..., 0], q[..., 0] | (q[..., 1] << 4))  # column 0 low, 1 high
    assert torch.equal(formats.unpack_int4(packed), q)


@pytest.mark.parametrize("kw,field", [
    (dict(name="int3"), "QuantFormat.name='int3'"),
    (dict(name="int4", group_size=16), "QuantFormat.group_size=16"),
    (dict(name="int4", group_size=256), "QuantFormat.group_size=256"),
    (dict(name="int4", group_size=96), "QuantFormat.group_size=96"),
])
def test_bad_format_names_the_field(kw, field):
    with pytest.raises(ConfigError) as e:
        QuantFormat(**kw)
    assert field in str(e.value) and "allowed" in str(e.value)


def test_group_size_must_divide_the_input_dim():
    with pytest.raises(ConfigError) as e:
        QuantFormat(name="int4", group_size=64).check_input_dim(96, "down_proj (d_expert)")
    msg = str(e.value)
    assert "QuantFormat.group_size=64" in msg and "down_proj (d_expert)" in msg and "(32)" in msg
    QuantFormat(name="int8", group_size=64).check_input_dim(96, "down_proj")  # int8 has no groups
