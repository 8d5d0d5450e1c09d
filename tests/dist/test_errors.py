"""Bad world / EP sizes: one clear error naming the flag, before any process starts."""

from __future__ import annotations

import pytest

from moelab.cli.main import main
from moelab.dist.mesh import check_sizes, init_dist
from moelab.dist.parallel import check_divisible
from moelab.errors import ConfigError
from moelab.model import ModelConfig, Transformer
from moelab.moe import MoEConfig


@pytest.mark.parametrize(("world", "ep", "match"), [
    (2, 3, "--ep 3 is larger than the world size 2"),
    (4, 3, "--ep 3 does not divide the world size 4"),
    (2, 0, "--ep must be an integer >= 1"),
])
def test_bad_ep_for_the_world(world, ep, match):
    with pytest.raises(ConfigError, match=match):
        check_sizes(world, ep)


def test_experts_must_divide_over_ep():
    moe = MoEConfig(d_model=16, d_expert=8, num_experts=6, top_k=2)
    model = Transformer(ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, d_ff=16, max_seq_len=8, moe=moe))
    check_divisible(model, 3)
    with pytest.raises(ConfigError, match=r"--ep 4: MoEConfig.num_experts=6 is not divisible"):
        check_divisible(model, 4)


def test_no_launcher_is_a_clear_error(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ConfigError, match="needs a launcher"):
        init_dist(2)


def test_cli_train_nproc_smaller_than_ep_is_one_line(capsys):
    assert main(["train", "--nproc", "2", "--ep", "3", "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["moelab train: error: --ep 3 is larger than the world size 2 (launch at least 3 processes)"]
