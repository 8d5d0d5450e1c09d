"""Shared fixtures: a small default corpus and tiny model/training configs (CPU, seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moelab.data import PreparedData, prepare_data
from moelab.model import ModelConfig
from moelab.moe import MoEConfig
from moelab.train import TrainConfig

VOCAB = 512


@pytest.fixture(scope="session")
def data(tmp_path_factory: pytest.TempPathFactory) -> PreparedData:
    # The four default domains, 40k characters each: about a second to build.
    return prepare_data(tmp_path_factory.mktemp("train-data"), max_chars_per_domain=40_000, vocab_size=VOCAB)


@pytest.fixture(autouse=True)
def _threads() -> None:
    # Bit-exact comparisons assume the same thread count in both runs.
    torch.set_num_threads(1)


def tiny_moe(**moe_changes) -> ModelConfig:
    fields = {"d_model": 32, "d_expert": 32, "num_experts": 4, "top_k": 2, "aux_loss_coef": 0.01,
              "z_loss_coef": 0.001, **moe_changes}
    moe = MoEConfig(**fields)
    return ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64,
                       max_seq_len=64, moe=moe)


def tiny_dense(d_ff: int = 64) -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=d_ff, max_seq_len=64)


def tiny_train(**changes) -> TrainConfig:
    base = dict(steps=12, batch_size=4, seq_len=32, lr=1e-2, warmup_steps=2, eval_interval=6, eval_batches=1,
                checkpoint_interval=6, log_interval=4, device="cpu")
    base.update(changes)
    return TrainConfig(**base)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"
