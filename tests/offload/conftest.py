"""Tiny MoE run directories for the offloading tests (CPU, milliseconds)."""

from __future__ import annotations

import pytest
import torch

from moelab.model import ModelConfig, Transformer
from moelab.moe import MoEConfig
from moelab.rundir import save_model

V = 64
D, F, E = 32, 16, 4
EXPERT_BYTES = (2 * F * D + D * F) * 4  # one swiglu expert in float32


def tiny_cfg(**moe_changes) -> ModelConfig:
    moe = MoEConfig(**{**dict(d_model=D, d_expert=F, num_experts=E, top_k=2), **moe_changes})
    return ModelConfig(vocab_size=V, d_model=D, n_layers=3, n_heads=2, n_kv_heads=1, d_ff=48, max_seq_len=64,
                       moe=moe, first_dense_layers=1)


def random_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for t in model.state_dict().values():
            t.normal_(0, 0.3)
    return model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads (and a shared 2-core machine stalls
    OpenMP barriers)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(model, run dir): a tiny MoE (one dense layer, then two MoE layers) saved as a run."""
    model = random_model(tiny_cfg())
    return model, save_model(model, tmp_path_factory.mktemp("offload") / "run")
