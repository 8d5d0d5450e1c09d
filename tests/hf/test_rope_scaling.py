"""RoPE scaling types beyond YaRN (`moelab.model.config.RopeScaling`): linear and llama3
(Llama 3.1 / Llama 4's published configs), against transformers' own frequencies and
forward, imported and exported."""

from __future__ import annotations

import math

import pytest
import torch

from moelab.errors import ConfigError
from moelab.hf import load_hf
from moelab.hf.export import export_hf
from moelab.model.config import RopeScaling
from moelab.model.layers import scaled_inv_freq

from .conftest import random_from_config

transformers = pytest.importorskip("transformers")
T = transformers

V = 96
# Positions well past the "original" context, so the scaled frequencies matter.
SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 10000.0},
}


def _hf_inv_freq(params: dict, head_dim: int) -> torch.Tensor:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = T.LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim, rope_parameters=params,
                        max_position_embeddings=64)
    inv, _ = ROPE_INIT_FUNCTIONS[params["rope_type"]](cfg, "cpu")
    return inv.double()


@pytest.mark.parametrize("kind", sorted(SCALINGS))
def test_frequencies_are_transformers(kind):
    p = SCALINGS[kind]
    head_dim = 16
    base = 1.0 / (p["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    sc = RopeScaling(kind=kind, **{k: v for k, v in p.items() if k not in ("rope_type", "rope_theta")})
    ours = scaled_inv_freq(base, sc)
    torch.testing.assert_close(ours, _hf_inv_freq(p, head_dim), rtol=1e-6, atol=0)
    assert not torch.allclose(ours, base)  # the scaling changes something


def _mixtral(params: dict):
    cfg = T.MixtralConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          num_local_experts=4, num_experts_per_tok=2, bos_token_id=None, eos_token_id=None,
                          pad_token_id=None, rope_parameters=dict(params))
    return random_from_config(cfg)


@pytest.mark.parametrize("kind", sorted(SCALINGS))
def test_import_and_export_keep_logit_parity(tmp_path, kind):
    hf = _mixtral(SCALINGS[kind])
    hf.save_pretrained(tmp_path / "hf")
    imp = load_hf(tmp_path / "hf")
    assert imp.config.rope_scaling is not None and imp.config.rope_scaling.kind == kind
    ids = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = hf(ids).logits, imp.model(ids).logits
    assert ref.abs().max() > 1.0 and (ref - got).abs().max().item() <= 1e-4
    # Export writes the scaling back; transformers reads the same model.
    export_hf(imp.model, tmp_path / "out")
    again = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert (again(ids).logits - ref).abs().max().item() <= 1e-4


def test_llama4_with_its_published_llama3_rope(tmp_path):
    params = dict(SCALINGS["llama3"])
    cfg = T.Llama4TextConfig(vocab_size=V, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                             max_position_embeddings=128, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                             rope_parameters=params, intermediate_size=16, intermediate_size_mlp=48,
                             num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
                             interleave_moe_layer_step=2, no_rope_layer_interval=2, attention_chunk_size=64)
    hf = random_from_config(cfg)
    hf.save_pretrained(tmp_path)
    imp = load_hf(tmp_path)
    ids = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = hf(ids).logits, imp.model(ids).logits
    assert (ref - got).abs().max().item() <= 1e-4


def test_bad_scalings_are_refused_by_name():
    with pytest.raises(ConfigError, match="RopeScaling.kind='ntk'"):
        RopeScaling(kind="ntk", factor=2.0)
    with pytest.raises(ConfigError, match="high_freq_factor > low_freq_factor"):
        RopeScaling(kind="llama3", factor=8.0, low_freq_factor=4.0, high_freq_factor=1.0)
    with pytest.raises(ConfigError, match="factor must be a finite number"):
        RopeScaling(kind="linear", factor=math.inf)


def test_a_bad_llama3_field_names_the_config_field(tmp_path):
    import json

    hf = _mixtral(SCALINGS["llama3"])
    hf.save_pretrained(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    d["rope_parameters"]["high_freq_factor"] = 0.5
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="rope_parameters.*llama3.*high_freq_factor"):
        load_hf(tmp_path)


def test_a_scaled_config_round_trips_through_a_run_directory(tmp_path):
    from moelab import rundir

    hf = _mixtral(SCALINGS["llama3"])
    hf.save_pretrained(tmp_path / "hf")
    imp = load_hf(tmp_path / "hf")
    run = rundir.save_model(imp.model, tmp_path / "run")
    loaded = rundir.load_model(run)
    assert loaded.config == imp.config and loaded.config.rope_scaling.kind == "llama3"
    ids = torch.randint(0, V, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, imp.model(ids).logits)
