"""Tiny random Hugging Face models for the CLI tests (convert, generate)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")


def make_hf(family: str = "mixtral", seed: int = 0, *, vocab_size: int = 64, max_positions: int = 256):
    """A tiny HF model with weights large enough that routing and logits vary a lot."""
    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if family == "mixtral":
        cfg = transformers.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)
    else:
        cfg = transformers.Qwen2MoeConfig(**common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                          shared_expert_intermediate_size=24)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.normal_(1, 0.2)
    return model


@pytest.fixture
def save_hf(tmp_path):
    """Save a tiny HF model (vocab 96, as tests/hf uses) under tmp_path; returns (model, folder)."""

    def _save(family: str = "mixtral", name: str | None = None, **kw):
        model = make_hf(family, vocab_size=96, max_positions=128, **kw)
        out = tmp_path / (name or family)
        model.save_pretrained(out)
        return model, out

    return _save
