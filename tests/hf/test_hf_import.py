"""Import parity: a HF folder loaded into moelab gives transformers' logits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from moelab.hf import from_pretrained, load_hf

MOE = ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe"]


def _logits_diff(hf_model, ours, seed=0):
    ids = torch.randint(0, ours.cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = hf_model(ids).logits
        got = ours(ids).logits
    assert got.shape == ref.shape
    return (ref - got).abs().max().item(), ref


@pytest.mark.parametrize("family", [*MOE, "llama"])
def test_import_matches_transformers(save_hf, family):
    hf_model, folder = save_hf(family)
    imp = load_hf(folder)
    assert imp.family == family and not imp.model.training
    assert next(imp.model.parameters()).dtype == torch.float32
    diff, ref = _logits_diff(hf_model, imp.model)
    assert ref.abs().max() > 1.0  # logits far from zero, so the check has teeth
    assert diff <= 1e-4, f"{family}: max abs logit diff {diff}"


def test_import_family_features(save_hf):
    _, folder = save_hf("qwen2_moe")
    cfg = load_hf(folder).config
    assert cfg.moe_layers == [0, 2] and cfg.attn_bias and cfg.moe.shared_expert_gate
    assert cfg.moe.d_shared_expert == 40 and not cfg.moe.norm_topk_prob
    _, folder = save_hf("olmoe")
    cfg = load_hf(folder).config
    assert cfg.qk_norm == "full" and cfg.clip_qkv == 0.8
    _, folder = save_hf("qwen3_moe")
    cfg = load_hf(folder).config
    assert cfg.qk_norm == "head" and cfg.tie_embeddings and cfg.moe.norm_topk_prob
    _, folder = save_hf("mixtral")
    assert load_hf(folder).config.rope_theta == 5e5


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_import_stacked_expert_layout(save_hf, family):
    """Checkpoints with stacked gate_up_proj/down_proj (transformers 5 in-memory names) load too."""
    hf_model, folder = save_hf(family)
    (folder / "model.safetensors").unlink()
    save_file({k: v.contiguous() for k, v in hf_model.state_dict().items()}, str(folder / "model.safetensors"))
    diff, _ = _logits_diff(hf_model, from_pretrained(folder))
    assert diff <= 1e-4


def test_import_sharded_checkpoint(save_hf):
    hf_model, folder = save_hf("mixtral")
    hf_model.save_pretrained(folder, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1
    diff, _ = _logits_diff(hf_model, from_pretrained(folder))
    assert diff <= 1e-4


def test_import_bf16_checkpoint_loads_as_fp32(save_hf):
    hf_model, folder = save_hf("mixtral")
    sd = load_file(str(folder / "model.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, str(folder / "model.safetensors"))
    model = from_pretrained(folder)
    assert model.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(model.embed_tokens.weight, sd["model.embed_tokens.weight"].to(torch.bfloat16).float())


def test_import_never_leaves_meta_tensors(save_hf):
    _, folder = save_hf("qwen3_moe")
    model = from_pretrained(folder)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert model.lm_head.weight is model.embed_tokens.weight  # tied stays tied
