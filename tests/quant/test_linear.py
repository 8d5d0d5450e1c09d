"""`QuantizedLinear` (``--what all``) against its dequantised reference, the linears rule, and
whole models quantised with ``what="all"``: saved, loaded, compiled.

As for the experts (tests/quant/test_experts.py): the kernels see bf16 activations, so the
reference is fed the bf16-rounded input; what is left is the kernel's bf16 output
rounding, hence 1e-2 of the output's scale. The dequantise fallback is float32: 1e-5.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from moelab.errors import ConfigError
from moelab.infer.generate import generate
from moelab.model import ModelConfig, Transformer
from moelab.moe import MoEConfig
from moelab.quant import (
    QuantFormat,
    QuantizedExperts,
    load_quantized,
    quantize_model,
    save_quantized,
)
from moelab.quant import experts as qexperts
from moelab.quant.linear import QuantizedLinear, quantizable_linears

FORMATS = {"int8": QuantFormat(name="int8"), "int4": QuantFormat(name="int4", group_size=32)}


def _linear(bias: bool, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(64, 48, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, 0.3)
        if bias:
            lin.bias.normal_(0, 0.3)
    return lin


def _reference(q: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    y = x.to(torch.bfloat16).float() @ q.weight.t()
    return y + q.bias if q.bias is not None else y


@pytest.mark.parametrize("rows", [5, 100])  # 3 x 100 rows: the bf16 GEMM of prefill (`int8_rows_mm`)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_the_kernel_equals_the_dequantised_reference(name, bias, rows):
    q = QuantizedLinear.from_linear(_linear(bias), FORMATS[name])
    x = torch.randn(3, rows, 64)
    with torch.inference_mode():
        y, ref = q(x), _reference(q, x)
    assert y.shape == (3, rows, 48) and y.dtype == torch.float32
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-2 * float(ref.abs().max()))


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_the_dequantise_fallback_equals_the_reference(name, monkeypatch):
    q = QuantizedLinear.from_linear(_linear(True), FORMATS[name])
    monkeypatch.setitem(qexperts._PROBED, name, False)
    x = torch.randn(4, 64)
    with torch.inference_mode():
        torch.testing.assert_close(q(x), x @ q.weight.t() + q.bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_quantisation_error_is_within_the_formats_bound(name):
    lin = _linear(False)
    q = QuantizedLinear.from_linear(lin, FORMATS[name])
    err = (q.weight - lin.weight).abs()
    # int8: half a step of the row's scale; int4: half a step of the group's (+ bf16 zero rounding).
    steps = lin.weight.abs().amax(1, keepdim=True) / 127 if name == "int8" else (
        (lambda w: (w.amax(-1) - w.amin(-1)) / 15)(lin.weight.reshape(48, 2, 32)).repeat_interleave(32, 1))
    assert bool((err <= steps * 0.5 * 1.02 + 1e-3).all())


def test_int4_holds_one_resident_copy_and_saves_the_portable_form_bit_for_bit():
    fmt = FORMATS["int4"]
    lin = _linear(True)
    q = QuantizedLinear.from_linear(lin, fmt)
    assert all(q._buffers[n] is None for n in ("qweight", "scale", "zero"))  # dropped after packing
    assert q.resident_nbytes() == q.nbytes()  # 48 x 32 bytes of nibbles + 48 x 2 groups x 4 bytes
    sd = q.state_dict()
    assert set(sd) == {"qweight", "scale", "zero", "bias"}
    other = QuantizedLinear(64, 48, True, fmt)
    other.load_state_dict(sd)
    x = torch.randn(2, 64)
    with torch.inference_mode():
        torch.testing.assert_close(other(x), q(x), rtol=0, atol=0)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in sd.items())


@pytest.mark.parametrize("out_features", [40, 1])
def test_int4_pads_output_rows_to_the_kernels_multiple_of_16(out_features):
    """An LM head of a 28093-token vocabulary, a 1-wide gate: the kernel's copy gets zero rows
    up to a multiple of 16, the output is sliced back, and the saved form is the unpadded one."""
    torch.manual_seed(1)
    lin = nn.Linear(64, out_features, bias=True)
    q = QuantizedLinear.from_linear(lin, FORMATS["int4"])
    packed, sz = q.kernel_weights()
    assert packed.shape[0] == sz.shape[1] == (48 if out_features == 40 else 16)
    x = torch.randn(2, 3, 64)
    with torch.inference_mode():
        y, ref = q(x), _reference(q, x)
    assert y.shape == (2, 3, out_features)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-2 * float(ref.abs().max()))
    assert (q.weight - lin.weight).abs().max() < 0.1  # the reference is the quantised weight itself
    sd = q.state_dict()
    assert sd["qweight"].shape == (out_features, 32) and sd["scale"].shape == (out_features, 2)
    assert q.nbytes() == out_features * (32 + 2 * 2 * 2)  # nibbles + bf16 scale and zero per group
    other = QuantizedLinear(64, out_features, True, FORMATS["int4"])
    other.load_state_dict(sd)
    with torch.inference_mode():
        assert torch.equal(other(x), y)


def test_inference_only():
    q = QuantizedLinear.from_linear(_linear(False), FORMATS["int8"])
    with pytest.raises(ConfigError, match="inference-only"):
        q(torch.randn(2, 64, requires_grad=True))


def _model(tie: bool = False, vocab: int = 128) -> Transformer:
    moe = MoEConfig(d_model=64, d_expert=64, num_experts=4, top_k=2)
    cfg = ModelConfig(vocab_size=vocab, d_model=64, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=96, max_seq_len=64,
                      moe=moe, first_dense_layers=1, tie_embeddings=tie)
    torch.manual_seed(0)
    return Transformer(cfg).eval()


def test_the_rule_takes_every_linear_but_routers_and_a_tied_head():
    take, skip = quantizable_linears(_model(), FORMATS["int8"])
    assert "lm_head" in take and not any("router" in n for n in take) and skip == []
    # layer 0 dense: q, k, v, o + gate, up, down; layer 1 MoE: q, k, v, o; + the LM head
    assert len(take) == 7 + 4 + 1
    take, skip = quantizable_linears(_model(tie=True), FORMATS["int8"])
    assert "lm_head" not in take and skip == ["lm_head"]
    # int4 takes a 120-row LM head (its kernel copy is padded); version-1 files left it float.
    take, skip = quantizable_linears(_model(vocab=120), FORMATS["int4"])
    assert "lm_head" in take and skip == []
    take, skip = quantizable_linears(_model(vocab=120), FORMATS["int4"], pad_rows=False)
    assert "lm_head" not in take and skip == ["lm_head"]


def test_an_int4_version_1_file_loads_with_its_float_lm_head(tmp_path):
    """Version 1 of the checkpoint left int4 linears with output rows not a multiple of 16
    float. Such a model (made here by putting the float LM head back) saves as version 1,
    loads as it was saved, and its logits are the same; today's rule quantises the head."""
    fmt = FORMATS["int4"]
    model = _model(vocab=120)
    head = model.lm_head
    quantize_model(model, fmt, what="all")
    model.lm_head = head
    ids = torch.randint(0, 120, (2, 7))
    with torch.inference_mode():
        want = model(ids, telemetry=False).logits
    run = save_quantized(model, tmp_path / "v1", fmt=fmt)
    assert json.loads((run / "config.json").read_text())["quant"]["moelab_quant_version"] == 1
    loaded = load_quantized(run).model
    assert type(loaded.lm_head) is nn.Linear
    with torch.inference_mode():
        assert torch.equal(loaded(ids, telemetry=False).logits, want)
    new = _model(vocab=120)
    quantize_model(new, fmt, what="all")
    run2 = save_quantized(new, tmp_path / "v2", fmt=fmt)
    assert json.loads((run2 / "config.json").read_text())["quant"]["moelab_quant_version"] == 2
    assert isinstance(load_quantized(run2).model.lm_head, QuantizedLinear)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_a_whole_model_saved_and_loaded_gives_the_same_logits(tmp_path, name):
    model = _model()
    ids = torch.randint(0, 128, (2, 7))
    with torch.inference_mode():
        ref = model(ids, telemetry=False).logits
    report = quantize_model(model, FORMATS[name], what="all")
    assert report.what == "all" and report.linears == 12
    with torch.inference_mode():
        out = model(ids, telemetry=False).logits
    assert (out - ref).abs().max() < 0.15 * ref.abs().max()  # quantised, but the same model
    run = save_quantized(model, tmp_path / name, fmt=FORMATS[name])
    loaded = load_quantized(run).model
    assert sum(isinstance(m, QuantizedLinear) for m in loaded.modules()) == 12
    with torch.inference_mode():
        assert torch.equal(loaded(ids, telemetry=False).logits, out)


def test_an_int8_head_beside_int4_linears_saves_as_version_3_and_loads_the_same(tmp_path):
    fmt = FORMATS["int4"]
    model = _model(vocab=120)
    float_head = model.lm_head
    x = torch.randn(5, 64)
    report = quantize_model(model, fmt, what="all", head="int8")
    assert report.head == "int8" and report.linears == 12
    head = model.lm_head
    assert isinstance(head, QuantizedLinear) and head.fmt == QuantFormat(name="int8")
    assert all(m.fmt == fmt for n, m in model.named_modules() if isinstance(m, QuantizedLinear) and n != "lm_head")
    # The head is int8's quantisation of the float head, finer than int4's.
    with torch.inference_mode():
        ref = float_head(x)
        err8 = (head(x) - ref).abs().mean()
        err4 = (QuantizedLinear.from_linear(float_head, fmt)(x) - ref).abs().mean()
    assert torch.equal(head.weight, QuantizedLinear.from_linear(float_head, QuantFormat(name="int8")).weight)
    assert err8 < err4 / 4
    ids = torch.randint(0, 120, (2, 7))
    with torch.inference_mode():
        want = model(ids, telemetry=False).logits
    run = save_quantized(model, tmp_path / "head8", fmt=fmt)
    entry = json.loads((run / "config.json").read_text())["quant"]
    assert entry["moelab_quant_version"] == 3 and entry["head"] == "int8"
    loaded = load_quantized(run).model
    assert loaded.lm_head.fmt == QuantFormat(name="int8")
    with torch.inference_mode():
        assert torch.equal(loaded(ids, telemetry=False).logits, want)
    again = save_quantized(loaded, tmp_path / "again", fmt=fmt)
    assert json.loads((again / "config.json").read_text())["quant"] == entry


def test_an_int8_head_is_refused_where_it_would_mean_nothing():
    with pytest.raises(ConfigError, match=r"head='int8' needs int4 with what='all' \(got int8"):
        quantize_model(_model(), "int8", what="all", head="int8")
    with pytest.raises(ConfigError, match=r"head='int8' needs int4 with what='all' \(got int4, what='experts'"):
        quantize_model(_model(), FORMATS["int4"], head="int8")
    with pytest.raises(ConfigError, match=r"head='int4' is not a head format; allowed: int8"):
        quantize_model(_model(), FORMATS["int4"], what="all", head="int4")
    tied = _model(tie=True)
    with pytest.raises(ConfigError, match="tied to its input embedding"):
        quantize_model(tied, FORMATS["int4"], what="all", head="int8")
    assert not any(isinstance(m, (QuantizedLinear, QuantizedExperts)) for m in tied.modules())  # left as it was


def test_a_partly_quantised_model_is_refused_on_save(tmp_path):
    model = _model()
    quantize_model(model, "int8", what="all")
    model.lm_head = nn.Linear(64, 128, bias=False)  # one linear back to float
    with pytest.raises(ConfigError, match="quantised only in part"):
        save_quantized(model, tmp_path / "q", fmt="int8")
    assert not (tmp_path / "q").exists()
    with pytest.raises(ConfigError, match="bf16"):
        quantize_model(_model(), "bf16", what="all")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_compiled_decode_of_a_whole_quantised_model_equals_eager(name):
    model = _model()
    quantize_model(model, FORMATS[name], what="all")
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    assert generate(model, prompts, max_new_tokens=6, compile=True).token_ids == \
        generate(model, prompts, max_new_tokens=6).token_ids


@pytest.mark.slow
@pytest.mark.parametrize("traced", [True, False], ids=["avx512", "avx2"])
def test_compiled_one_row_decode_of_an_int8_model_equals_eager(traced, monkeypatch):
    """One prompt: every int8 linear of the compiled step sees one row, where it runs the
    traced reduction (`int8_rows_traced`) instead of the kernel where that pays
    (`traced_int8_pays`, both answers forced here); same greedy tokens."""
    import moelab.quant.experts as qexperts
    import moelab.quant.linear as qlinear

    monkeypatch.setattr(qlinear, "traced_int8_pays", lambda: traced)
    monkeypatch.setattr(qexperts, "traced_int8_pays", lambda: traced)
    model = _model()
    quantize_model(model, FORMATS["int8"], what="all")
    for prompt in ([1, 2, 3], [9, 40, 7, 7, 100]):
        assert generate(model, [prompt], max_new_tokens=8, compile=True).token_ids == \
            generate(model, [prompt], max_new_tokens=8).token_ids
