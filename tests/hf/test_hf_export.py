"""Export: transformers loads what we write and computes our logits; round trips are exact."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from moelab.errors import CheckpointError, ConfigError
from moelab.hf import export_hf, from_pretrained, hf_family_for
from moelab.model import ModelConfig, Transformer
from moelab.moe import MoEConfig

transformers = pytest.importorskip("transformers")


def _cfg(**kw) -> ModelConfig:
    moe = kw.pop("moe", dict(num_experts=4, top_k=2))
    base = dict(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=40, max_seq_len=64)
    base.update(kw)
    return ModelConfig(**base, moe=MoEConfig(d_model=32, d_expert=24, **moe) if moe is not None else None)


CASES = {
    "mixtral": _cfg(),
    "mixtral_window_tied": _cfg(sliding_window=8, tie_embeddings=True),
    "qwen3_moe": _cfg(qk_norm="head", head_dim=16, first_dense_layers=1, moe=dict(num_experts=4, top_k=2, norm_topk_prob=False)),
    "olmoe": _cfg(qk_norm="full", clip_qkv=0.7, moe=dict(num_experts=4, top_k=3, norm_topk_prob=False)),
    "qwen2_moe": _cfg(attn_bias=True, moe=dict(num_experts=4, top_k=2, num_shared_experts=1, d_shared_expert=20, shared_expert_gate=True)),
    "llama": _cfg(moe=None),
    "mistral": _cfg(moe=None, sliding_window=8),
}


def _random_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.normal_(1, 0.2)
    return model


def _tokenizer(path):
    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate("the a cat dog sat on mat".split())}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(path))
    return tok


@pytest.mark.parametrize("name", list(CASES))
def test_export_loads_in_transformers_with_our_logits(tmp_path, name):
    model = _random_model(CASES[name])
    family = name.split("_window")[0]
    assert hf_family_for(model.cfg) == family
    out = export_hf(model, tmp_path / "hf").out_dir
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.config.model_type == family
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = model(ids).logits, hf(ids).logits
    assert ref.abs().max() > 1.0
    assert (ref - got).abs().max().item() <= 1e-4
    # ... and back: bit-exact round trip.
    back = from_pretrained(out)
    assert back.cfg.moe_layers == model.cfg.moe_layers
    for (k, a), (k2, b) in zip(model.state_dict().items(), back.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k
    assert torch.equal(back(ids).logits, ref)


def test_hf_to_moelab_to_hf_is_bit_exact(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.Qwen2MoeConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                                      num_experts_per_tok=2, moe_intermediate_size=16,
                                      shared_expert_intermediate_size=40)
    hf = transformers.AutoModelForCausalLM.from_config(cfg)
    hf.save_pretrained(tmp_path / "a")
    export_hf(from_pretrained(tmp_path / "a"), tmp_path / "b")
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sharded_export_with_index(tmp_path):
    model = _random_model(CASES["mixtral"])
    res = export_hf(model, tmp_path / "hf", max_shard_size=30_000)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(res.files) > 1 and set(index["weight_map"].values()) == {f.name for f in res.files}
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 96, (1, 7))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids).logits).abs().max() <= 1e-4
    assert torch.equal(from_pretrained(tmp_path / "hf")(ids).logits, model(ids).logits)


def test_export_tokenizer_loads_with_autotokenizer(tmp_path):
    tok = _tokenizer(tmp_path / "tokenizer.json")
    export_hf(_random_model(CASES["mixtral"]), tmp_path / "hf", tokenizer_path=tmp_path / "tokenizer.json")
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert isinstance(auto, transformers.PreTrainedTokenizerFast)
    text = "the cat sat on the mat"
    assert auto(text, add_special_tokens=False)["input_ids"] == tok.encode(text).ids
    assert auto.eos_token == "<|endoftext|>"
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == 0


@pytest.mark.parametrize(
    "cfg, feature",
    [
        (_cfg(moe=dict(num_experts=4, top_k=2, router="sigmoid")), "router='sigmoid'"),
        (_cfg(moe=dict(num_experts=4, top_k=2, norm_topk_prob=False)), "norm_topk_prob=False"),
        (_cfg(moe=dict(num_experts=4, top_k=2, num_shared_experts=1)), "shared experts without a sigmoid gate"),
        (_cfg(moe=dict(num_experts=4, top_k=2, router_dtype="bfloat16")), "router_dtype='bfloat16'"),
        (_cfg(moe=dict(num_experts=4, top_k=2, routed_scaling_factor=2.0)), "routed_scaling_factor=2.0"),
        (_cfg(first_dense_layers=1), "dense layers"),
        (_cfg(moe=None, attn_bias=True), "attn_bias"),
    ],
)
def test_unexportable_features_are_named(tmp_path, cfg, feature):
    with pytest.raises(ConfigError, match="no equivalent") as e:
        export_hf(_random_model(cfg), tmp_path / "hf")
    assert feature in str(e.value)
    assert not (tmp_path / "hf").exists()


def test_export_refuses_non_empty_dir(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match="not empty"):
        export_hf(_random_model(CASES["llama"]), tmp_path / "hf")
    assert (tmp_path / "hf" / "keep.txt").read_text() == "x"


def test_exported_folder_gets_the_umask_mode(tmp_path):
    """Not mkdtemp's 0700: the folder is readable by whoever may read the files in it."""
    import stat

    from moelab import io

    out = export_hf(_random_model(_cfg()), tmp_path / "hf").out_dir
    want = 0o777 & ~io._UMASK
    assert stat.S_IMODE(out.stat().st_mode) == want
    assert stat.S_IMODE((out / "config.json").stat().st_mode) == 0o666 & ~io._UMASK
    export_hf(_random_model(_cfg(), seed=1), out, overwrite=True)  # replaced in place, same mode
    assert stat.S_IMODE(out.stat().st_mode) == want
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # nothing left beside it


def test_export_onto_a_file_is_one_clear_error(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointError, match="is a file, not a folder"):
        export_hf(_random_model(_cfg()), tmp_path / "f")
