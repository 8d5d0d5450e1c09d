"""Tiny imported models for generation tests."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

V = 64


def make_hf(family: str = "mixtral", seed: int = 0):
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, bos_token_id=None, eos_token_id=None,
                  pad_token_id=None)
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


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(transformers model, our import of it) for a tiny Mixtral."""
    from moelab.hf import from_pretrained

    hf = make_hf("mixtral")
    folder = tmp_path_factory.mktemp("mixtral")
    hf.save_pretrained(folder)
    return hf, from_pretrained(folder)


class CharTokenizer:
    """id -> one letter; enough to test text, streaming and stop strings."""

    def decode(self, ids):
        return "".join(chr(ord("a") + i % 26) for i in ids)
