"""Tiny models and saved run directories for the run-directory tests (CPU, milliseconds)."""

from __future__ import annotations

import pytest
import torch

from moelab.model import ModelConfig, Transformer
from moelab.moe import MoEConfig
from moelab.rundir import save_model

VOCAB = 64


def tiny_cfg(**changes) -> ModelConfig:
    moe = MoEConfig(d_model=32, d_expert=16, num_experts=4, top_k=2, router="sigmoid", bias_update_rate=0.01)
    base = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=48, max_seq_len=64,
                moe=moe)
    return ModelConfig(**{**base, **changes})


def random_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """A model whose every tensor (the expert-bias buffers too) differs from its init."""
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for t in model.state_dict().values():
            t.normal_(0, 0.3)
    return model


@pytest.fixture
def saved(tmp_path):
    """(model, run dir) for a tiny MoE saved with `save_model`."""
    model = random_model(tiny_cfg())
    return model, save_model(model, tmp_path / "run")
