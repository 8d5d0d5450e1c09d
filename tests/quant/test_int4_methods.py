"""The calibration-free int4 methods `benchmarks.int4_methods` measures against RTN (HQQ, an
MSE range search): they must write the library's int4 form and do what they are for, or
the benchmark's verdict ("no better than RTN on a trained model") would mean nothing."""

from __future__ import annotations

import pytest
import torch

from benchmarks.int4_methods import METHODS, int4_method, quantize_int4_hqq, quantize_int4_mse
from moelab.model import ModelConfig, Transformer
from moelab.moe import MoE, MoEConfig
from moelab.quant import QuantFormat, formats, quantize_model

G = 32


def _heavy_tailed(*shape: int, seed: int = 0) -> torch.Tensor:
    """Student-t weights (a few large ones per group, as trained weights have), plus a
    constant group, which must not divide by zero."""
    torch.manual_seed(seed)
    w = torch.distributions.StudentT(3.0).sample(shape) * 0.02
    w[0, 0, :G] = 0.125
    return w


def _group_errors(w: torch.Tensor, q, scale, zero) -> torch.Tensor:
    return (formats.dequantize_int4(q, scale, zero) - w).reshape(*w.shape[:-1], -1, G)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_writes_the_librarys_int4_form(method):
    w = _heavy_tailed(2, 24, 128)
    q, scale, zero = METHODS[method](w, G)
    assert q.dtype == torch.uint8 and q.shape == w.shape and int(q.max()) <= 15
    assert scale.dtype == zero.dtype == torch.bfloat16 and scale.shape == zero.shape == (2, 24, 128 // G)
    # The nibbles are RTN's on the method's own grid: nearest level, so the kernel (which
    # only sees q, scale, zero) and `dequantize_int4` compute the same weights.
    s, z = scale.float().unsqueeze(-1), zero.float().unsqueeze(-1)
    levels = torch.arange(16).float().view(16, 1, 1, 1, 1)
    wg = w.reshape(2, 24, -1, G)
    err_all = ((levels - 8) * s + z - wg).abs()  # (16, 2, 24, N, G)
    chosen = err_all.gather(0, q.reshape(1, 2, 24, -1, G).long())[0]
    assert bool((chosen <= err_all.amin(0) + 1e-7).all())
    assert float(_group_errors(w, q, scale, zero)[0, 0, 0].abs().max()) == 0.0  # the constant group: exact


def test_hqq_lowers_the_mean_absolute_error_it_minimises():
    w = _heavy_tailed(4, 64, 256, seed=1)
    rtn = _group_errors(w, *formats.quantize_int4(w, G)).abs().mean()
    hqq = _group_errors(w, *quantize_int4_hqq(w, G)).abs().mean()
    assert float(hqq) < 0.99 * float(rtn)


def test_mse_search_is_never_worse_than_rtn_in_any_group_and_better_overall():
    w = _heavy_tailed(4, 64, 256, seed=2)
    rtn = _group_errors(w, *formats.quantize_int4(w, G)).pow(2).sum(-1)
    mse = _group_errors(w, *quantize_int4_mse(w, G)).pow(2).sum(-1)
    # The search's grid holds RTN's own range (a = b = 1), so no group can get worse.
    assert bool((mse <= rtn * (1 + 1e-6) + 1e-12).all())
    assert float(mse.sum()) < 0.9 * float(rtn.sum())


def test_int4_method_swaps_the_quantiser_for_the_module_swap_and_restores_it():
    torch.manual_seed(0)
    moe_cfg = MoEConfig(d_model=64, d_expert=32, num_experts=4, top_k=2)
    model = Transformer(ModelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, d_ff=64, moe=moe_cfg,
                                    max_seq_len=64)).eval()
    w_in = next(m for m in model.modules() if isinstance(m, MoE)).experts.w_in.detach().clone()
    rtn = formats.quantize_int4
    with int4_method("mse"):
        assert formats.quantize_int4 is quantize_int4_mse
        quantize_model(model, QuantFormat(name="int4", group_size=G))
    assert formats.quantize_int4 is rtn
    experts = next(m for m in model.modules() if isinstance(m, MoE)).experts
    # The experts hold the method's quantisation of the float weights, not RTN's.
    want = formats.dequantize_int4(*quantize_int4_mse(w_in, G))
    assert torch.equal(experts.dequantized_weight("in"), want)
    assert not torch.equal(want, formats.dequantize_int4(*formats.quantize_int4(w_in, G)))
