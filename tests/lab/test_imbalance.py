"""The costs of an imbalanced router: pure functions of loads, and the measurement on a
model's routers checked against the MoE layer's own dispatcher (the slow reference)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from moelab.errors import ConfigError
from moelab.lab.imbalance import (
    device_loads,
    effective_experts,
    ep_step_factor,
    measure_routing_costs,
)
from moelab.lab.run_summary import crossing_step
from moelab.model import Transformer


def test_device_loads_split_experts_contiguously_like_shard_experts() -> None:
    assert device_loads([1, 2, 3, 4, 5, 6, 7, 8], 2).tolist() == [10, 26]
    assert device_loads([1, 2, 3, 4, 5, 6, 7, 8], 4).tolist() == [3, 7, 11, 15]
    with pytest.raises(ConfigError, match="divisor of num_experts=8"):
        device_loads([1] * 8, 3)


@pytest.mark.parametrize("ep", [2, 4, 8])
def test_ep_step_factor_is_one_balanced_and_ep_when_one_device_takes_all(ep: int) -> None:
    assert ep_step_factor([[5.0] * 8], ep) == pytest.approx(1.0)
    assert ep_step_factor([[16.0] + [0.0] * 7], ep) == pytest.approx(ep)
    # Two experts take everything: they share device 0 up to EP=4; at EP=8 each has its own.
    assert ep_step_factor([[10.0, 6.0] + [0.0] * 6], ep) == pytest.approx(ep if ep <= 4 else 10 / 2)
    assert ep_step_factor([[0.0] * 8], ep) == 1.0


def test_ep_step_factor_sums_each_layers_busiest_device() -> None:
    # Layer 0 all on device 0, layer 1 balanced: (4 + 2) busiest rows vs (2 + 2) mean.
    loads = [[4, 0, 0, 0], [1, 1, 1, 1]]
    assert ep_step_factor(loads, 2) == pytest.approx((4 + 2) / (2 + 2))
    # Not the mean of per-layer factors (2 and 1 -> 1.5 too here; differs with unequal totals).
    assert ep_step_factor([[8, 0, 0, 0], [1, 1, 1, 1]], 2) == pytest.approx((8 + 2) / (4 + 2))


def test_effective_experts() -> None:
    assert effective_experts([3, 3, 3, 3, 3, 3, 3, 3]) == pytest.approx(8)
    assert effective_experts([5, 5, 0, 0, 0, 0, 0, 0]) == pytest.approx(2)
    assert 1 < effective_experts([9, 1, 0, 0]) < 2
    assert effective_experts([0, 0]) == 0.0


def test_crossing_step_is_where_a_passes_b_for_good() -> None:
    b = [[0, 9.0], [10, 6.0], [20, 5.0], [30, 4.5], [40, 4.2]]
    assert crossing_step([[0, 9.0], [10, 6.5], [20, 4.9], [30, 4.4], [40, 4.1]], b) == 20
    assert crossing_step([[0, 9.0], [10, 5.9], [20, 5.1], [30, 4.4], [40, 4.1]], b) == 30  # fell back at 20
    assert crossing_step([[0, 9.0], [10, 5.0], [20, 4.0], [30, 4.4], [40, 4.3]], b) is None  # behind at the end
    assert crossing_step([[5, 1.0]], b) is None  # no common step


@pytest.mark.parametrize("cf", [1.0, 1.25])
def test_measured_drops_and_loads_equal_the_moe_layers_own_dispatch(cf: float, lab_cfg) -> None:
    """One MoE layer: its input is the same with or without a capacity, so the measured
    drop rate must equal what the layer's dispatcher drops with that capacity factor."""
    torch.manual_seed(0)
    cfg = lab_cfg.with_(n_layers=1).model_config(512, aux_loss_coef=0.0)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        model.moe_layers[0].router.weight[0] += 0.5  # skewed: some expert overflows
    capped = Transformer(cfg.with_(moe=replace(cfg.moe, capacity_factor=cf))).eval()
    capped.load_state_dict(model.state_dict())
    batches = [torch.randint(0, 512, (3, 16)) for _ in range(2)]
    costs = measure_routing_costs(model, batches, capacity_factor=cf, ep_sizes=(2, 4))
    dropped = assigned = 0
    calls = []
    with torch.no_grad():
        for ids in batches:
            s = capped(ids).layer_stats
            (stats,) = s.values()
            dropped += int(stats.dropped)
            assigned += stats.num_tokens * stats.top_k
            calls.append(next(iter(model(ids).layer_stats.values())).tokens_per_expert.numpy())
    load = np.sum(calls, axis=0)
    assert dropped > 0
    assert costs.dropped_fraction == pytest.approx(dropped / assigned)
    assert costs.load_LE == [load.tolist()]
    # Each batch's call waits for its own busiest device: not the factor of the summed load.
    assert costs.ep_step_factor == {"2": pytest.approx(ep_step_factor(calls, 2)),
                                    "4": pytest.approx(ep_step_factor(calls, 4))}
    assert costs.ep_step_factor["4"] >= ep_step_factor([load], 4) - 1e-12
    assert math.isclose(costs.effective_experts, effective_experts(load))
    assert measure_routing_costs(Transformer(cfg.with_(moe=None)), batches, capacity_factor=cf, ep_sizes=(2,)) is None
