"""gpt-oss's MXFP4 experts: our dequantisation against transformers' own, and a gpt-oss
folder whose experts are stored as MXFP4 (as published checkpoints are) imported with
logit parity against transformers' forward on the same dequantised weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from moelab.errors import CheckpointError
from moelab.hf import load_hf
from moelab.hf.mxfp4 import dequantize_mxfp4, quantize_mxfp4

transformers = pytest.importorskip("transformers")
mx = pytest.importorskip("transformers.integrations.mxfp4")


def test_dequantisation_is_transformers_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 40, 2, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(110, 140, (3, 40, 2), generator=g, dtype=torch.uint8)
    ours = dequantize_mxfp4(blocks, scales)
    ref = mx.convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # the x @ W operand [E, I, O]
    assert ours.shape == (3, 40, 64) and torch.equal(ours, ref.transpose(1, 2))


def test_dequantisation_in_chunks_of_rows_is_transformers_bit_for_bit():
    g = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 256, (2, 2100, 1, 16), generator=g, dtype=torch.uint8)  # 4200 rows: two chunks
    scales = torch.randint(110, 140, (2, 2100, 1), generator=g, dtype=torch.uint8)
    ref = mx.convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    assert torch.equal(dequantize_mxfp4(blocks, scales), ref.transpose(1, 2))


def test_quantisation_round_trips_and_is_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(2, 16, 96) * 0.05
    blocks, scales = quantize_mxfp4(w)
    dq = dequantize_mxfp4(blocks, scales)
    b2, s2 = quantize_mxfp4(dq)
    assert torch.equal(b2, blocks) and torch.equal(s2, scales)  # FP4 values are fixed points
    # The widest gap between FP4 values (4 -> 6) is 2 scale units: half a step is 1 unit.
    # The OCP scale puts a block's largest magnitude in [4, 8) units, so values past 6
    # saturate at 6: at most 2 units off.
    unit = torch.ldexp(torch.ones(scales.shape), scales.to(torch.int32) - 127).repeat_interleave(32, -1)
    err, inside = (dq - w).abs(), w.abs() <= 6 * unit
    assert bool((err[inside] <= unit[inside]).all()) and bool((err <= 2 * unit).all())
    assert not bool(inside.all())  # the saturating case is exercised


def test_bad_blocks_and_scales_are_named():
    with pytest.raises(CheckpointError, match="layer.0: MXFP4 blocks .* do not fit"):
        dequantize_mxfp4(torch.zeros(2, 4, 2, 16, dtype=torch.uint8), torch.zeros(2, 4, 3, dtype=torch.uint8),
                         name="layer.0")
    with pytest.raises(CheckpointError, match="must be uint8"):
        dequantize_mxfp4(torch.zeros(2, 4, 2, 16), torch.zeros(2, 4, 2, dtype=torch.uint8))


def _gpt_oss(seed: int = 0):
    cfg = transformers.GptOssConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=16, intermediate_size=32, num_local_experts=4,
                                    num_experts_per_tok=2, sliding_window=4, max_position_embeddings=128,
                                    bos_token_id=None, eos_token_id=None, pad_token_id=None,
                                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.normal_(1, 0.2) if "norm" in name else p.normal_(0, 0.5)
    return model


def _to_mxfp4_folder(model, folder) -> None:
    """Save `model`, then store its experts as MXFP4 (blocks + scales) as published gpt-oss
    checkpoints do, and put the dequantised weights back into `model` (the reference)."""
    model.save_pretrained(folder)
    st = load_file(folder / "model.safetensors")
    params = dict(model.named_parameters())
    for key in [k for k in st if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        blocks, scales = quantize_mxfp4(st.pop(key).transpose(1, 2))  # rows = the operand's columns
        st[f"{key}_blocks"], st[f"{key}_scales"] = blocks, scales
        with torch.no_grad():
            params[key].copy_(mx.convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    save_file(st, folder / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (folder / "config.json").write_text(json.dumps(cfg))


def test_an_mxfp4_gpt_oss_folder_imports_with_logit_parity(tmp_path):
    model = _gpt_oss()
    _to_mxfp4_folder(model, tmp_path)
    assert any(k.endswith("_blocks") for k in load_file(tmp_path / "model.safetensors"))
    imp = load_hf(tmp_path)
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = model(ids).logits, imp.model(ids).logits
    assert ref.abs().max() > 1.0
    assert (ref - got).abs().max().item() <= 1e-4


def test_a_broken_mxfp4_tensor_names_the_file_and_tensor(tmp_path):
    _to_mxfp4_folder(_gpt_oss(), tmp_path)
    st = load_file(tmp_path / "model.safetensors")
    key = next(k for k in st if k.endswith("down_proj_scales"))
    st[key] = st[key][..., :0]  # scales that do not match the blocks
    save_file(st, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*down_proj_blocks.*do not fit"):
        load_hf(tmp_path)


def test_an_mxfp4_import_exports_back_as_float(tmp_path, capsys):
    from moelab.cli.main import main

    model = _gpt_oss()
    _to_mxfp4_folder(model, tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), "--to-moelab", str(tmp_path / "run")]) == 0
    assert main(["convert", str(tmp_path / "run"), "--to-hf", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (back(ids).logits - model(ids).logits).abs().max().item() <= 1e-5
