"""Shared fixtures for the MoE tests: paired fast/reference layers in float64."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch

from moelab.moe import MoE, MoEConfig


def _make_pair(cfg: MoEConfig, *, seed: int = 0, std: float = 0.3) -> tuple[MoE, MoE]:
    """(fast, loop) layers in float64 with identical, non-trivial weights.

    ``std`` is far above the training init so routing margins are large (no near-ties
    that finite differences could cross) and expert outputs are O(1).
    """
    torch.manual_seed(seed)
    fast = MoE(dataclasses.replace(cfg, impl="grouped")).double()
    fast.reset_parameters(std=std)
    if cfg.router == "sigmoid":
        with torch.no_grad():
            fast.router.expert_bias.copy_(0.1 * torch.randn(cfg.num_experts))
    ref = MoE(dataclasses.replace(cfg, impl="loop")).double()
    ref.load_state_dict(fast.state_dict())
    return fast, ref


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a shared 2-core machine
    OpenMP barriers make every small op wait for a descheduled thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def make_pair() -> Callable[..., tuple[MoE, MoE]]:
    return _make_pair
