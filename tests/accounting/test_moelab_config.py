"""Sizing moelab's own models: the count equals `Transformer(cfg)`'s parameters."""

from __future__ import annotations

import pytest
import torch

from moelab import model
from moelab.accounting.moelab_config import spec_from_moelab_config
from moelab.accounting.params import count_params
from moelab.moe import MoEConfig


def _count(cfg) -> int:
    with torch.device("meta"):
        net = model.Transformer(cfg)
    return sum(p.numel() for p in net.parameters())


def _variants():
    base = model.ModelConfig(vocab_size=301, d_model=32, n_layers=5, n_heads=4, n_kv_heads=2, d_ff=48)
    moe = MoEConfig(d_model=32, d_expert=24, num_experts=6, top_k=2)
    return {
        **{name: cfg for name, cfg in model.PRESETS.items()},
        "dense-tied-bias-qknorm": base.with_(tie_embeddings=True, attn_bias=True, qk_norm="head"),
        "moe-interleaved": base.with_(moe=moe, moe_layer_freq=2, first_dense_layers=1, dense_layers=(4,)),
        "moe-shared-gated-gelu-noisy": base.with_(
            head_dim=12, qk_norm="full",
            moe=MoEConfig(d_model=32, d_expert=24, num_experts=5, top_k=1, num_shared_experts=2,
                          d_shared_expert=40, shared_expert_gate=True, activation="gelu",
                          noisy_gating=True)),
    }


VARIANTS = _variants()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_total_equals_transformer_parameters(name):
    cfg = VARIANTS[name]
    assert count_params(spec_from_moelab_config(cfg)).total == _count(cfg)
