"""DBRX (`dbrx`): LayerNorm without bias, a fused Wqkv with clip_qkv, experts as [E F, D]
matrices; imported with logit parity against transformers, generated from, and exported
back through its recorded config.json."""

from __future__ import annotations

import json

import pytest
import torch

from moelab.cli.main import main
from moelab.errors import ConfigError
from moelab.hf import load_hf

from .conftest import random_from_config

transformers = pytest.importorskip("transformers")
V = 96


def _dbrx(**ffn):
    cfg = transformers.DbrxConfig(
        d_model=32, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=V,
        attn_config={"kv_n_heads": 2, "clip_qkv": 1.5, "rope_theta": 10000.0},
        ffn_config={"ffn_hidden_size": 16, "moe_num_experts": 4, "moe_top_k": 2, **ffn})
    return random_from_config(cfg)


@pytest.mark.parametrize("ffn", [{}, {"moe_normalize_expert_weights": None}], ids=["renorm", "no-renorm"])
def test_logit_parity_and_the_features_read(tmp_path, ffn):
    hf = _dbrx(**ffn)
    hf.save_pretrained(tmp_path)
    imp = load_hf(tmp_path)
    cfg = imp.config
    assert cfg.norm == "layer" and cfg.clip_qkv == 1.5 and cfg.kv_heads == 2
    assert cfg.moe.norm_topk_prob == (not ffn)
    ids = torch.randint(0, V, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = hf(ids).logits, imp.model(ids).logits
    assert ref.abs().max() > 1.0
    assert (ref - got).abs().max().item() <= 1e-4
    # The clamp has teeth on these weights: transformers' own model without it differs.
    for block in hf.transformer.blocks:
        block.norm_attn_norm.attn.clip_qkv = 1e9  # (None fails in its clamp)
    with torch.no_grad():
        assert (hf(ids).logits - ref).abs().max().item() > 1e-2
    from moelab.infer.generate import generate

    out = generate(imp.model, [[1, 2, 3]], max_new_tokens=4)
    assert len(out.token_ids[0]) == 4


def test_round_trip_export(tmp_path, capsys):
    hf = _dbrx()
    hf.save_pretrained(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), "--to-moelab", str(tmp_path / "run")]) == 0
    assert main(["convert", str(tmp_path / "run"), "--to-hf", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    back, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    for k, t in hf.state_dict().items():
        assert torch.equal(back.state_dict()[k], t), k


def test_an_unsupported_normalisation_is_refused_by_name(tmp_path):
    _dbrx().save_pretrained(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    d["ffn_config"]["moe_normalize_expert_weights"] = 2.0
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="moe_normalize_expert_weights'=2.0 is not supported"):
        load_hf(tmp_path)
