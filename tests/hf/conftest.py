"""Tiny random Hugging Face models, one per supported family, saved with save_pretrained."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

V = 96


def hf_config(family: str, **overrides):
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if family == "mixtral":
        cfg = transformers.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2, rope_theta=5e5)
    elif family == "olmoe":
        cfg = transformers.OlmoeConfig(**common, num_experts=4, num_experts_per_tok=2, clip_qkv=0.8)
    elif family == "qwen2_moe":
        common["num_hidden_layers"] = 3
        cfg = transformers.Qwen2MoeConfig(**common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                          shared_expert_intermediate_size=40, mlp_only_layers=[1])
    elif family == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(**common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                          head_dim=16, norm_topk_prob=True, tie_word_embeddings=True)
    elif family == "llama":
        cfg = transformers.LlamaConfig(**common)
    else:
        raise ValueError(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def random_from_config(cfg, seed: int = 0):
    """``AutoModelForCausalLM.from_config(cfg)`` with weights large enough that routing and
    logits vary a lot (the default init leaves norms at 1 and logits near 0, which would
    hide mistakes)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
            else:
                p.normal_(1, 0.2)
    return model


def random_hf_model(family: str, seed: int = 0, **overrides):
    """A tiny HF model of `family` (`hf_config`), random as `random_from_config` makes it."""
    return random_from_config(hf_config(family, **overrides), seed)


@pytest.fixture
def save_hf(tmp_path):
    def _save(family: str, name: str | None = None, **kw):
        model = random_hf_model(family, **kw)
        out = tmp_path / (name or family)
        model.save_pretrained(out)
        return model, out

    return _save
