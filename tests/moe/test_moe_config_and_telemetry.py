"""Config validation (errors name the field) and routing telemetry."""

from __future__ import annotations

import math

import pytest
import torch

from moelab.moe import MoE, MoEConfig, NonFiniteRouterError, RoutingStats

BASE = dict(d_model=8, d_expert=4, num_experts=4, top_k=2)


@pytest.mark.parametrize(
    ("overrides", "substrings"),
    [
        (dict(top_k=5), ["top_k=5", "num_experts=4"]),
        (dict(d_model=0), ["d_model", "positive"]),
        (dict(d_expert=-3), ["d_expert", "-3"]),
        (dict(num_experts=0, top_k=1), ["num_experts", "positive"]),
        (dict(top_k=0), ["top_k", "positive"]),
        (dict(router="hash"), ["router", "'hash'", "softmax"]),
        (dict(capacity_factor=0.0), ["capacity_factor", "> 0"]),
        (dict(capacity_factor=-1.0), ["capacity_factor"]),
        (dict(capacity_factor=math.nan), ["capacity_factor"]),
        (dict(router="expert_choice", causal=True), ["expert_choice", "causal"]),
        (dict(router="switch"), ["switch", "top_k must be 1"]),
        (dict(drop_policy="random"), ["drop_policy"]),
        (dict(activation="relu"), ["activation", "'relu'"]),
        (dict(impl="triton"), ["impl"]),
        (dict(n_group=3, router="sigmoid", num_experts=4), ["num_experts=4", "n_group=3"]),
        (dict(n_group=2, router="switch", top_k=1), ["n_group", "sigmoid"]),
        (dict(shared_expert_gate=True), ["shared_expert_gate", "num_shared_experts"]),
        (dict(aux_loss_coef=-0.1), ["aux_loss_coef"]),
        (dict(jitter_eps=1.5), ["jitter_eps"]),
        (dict(router="switch", top_k=1, routed_scaling_factor=2.0), ["routed_scaling_factor", "'switch'"]),
        (dict(router_dtype="float16"), ["router_dtype", "'float16'", "bfloat16"]),
    ],
)
def test_invalid_config_raises_value_error_naming_the_field(overrides, substrings):
    with pytest.raises(ValueError) as info:
        MoEConfig(**{**BASE, **overrides})
    for s in substrings:
        assert s in str(info.value), (s, str(info.value))


def test_from_dict_rejects_unknown_fields_and_round_trips():
    cfg = MoEConfig(**BASE)
    assert MoEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown field"):
        MoEConfig.from_dict({**BASE, "num_expert": 3})


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("impl", ["grouped", "loop"])
def test_non_finite_router_logits_raise(bad, impl):
    layer = MoE(MoEConfig(**BASE, impl=impl))
    x = torch.randn(5, 8)
    x[2, 3] = bad
    with pytest.raises(ValueError, match="NaN/Inf") as info:
        layer(x)
    assert isinstance(info.value, NonFiniteRouterError)
    assert "input finite: False" in str(info.value)


def test_wrong_input_width_names_d_model():
    with pytest.raises(ValueError, match="d_model=8"):
        MoE(MoEConfig(**BASE))(torch.randn(3, 7))


def test_stats_present_and_consistent():
    torch.manual_seed(0)
    layer = MoE(MoEConfig(**BASE, capacity_factor=1.0))
    out = layer(torch.randn(2, 16, 8), return_routing=True)
    d = out.stats.to_dict()
    expected = {
        "tokens_per_expert",
        "num_tokens",
        "dropped",
        "dropped_fraction",
        "busiest_expert_share",
        "load_cv",
        "dead_experts",
        "router_entropy",
        "max_router_logit",
    }
    assert set(d) == expected
    assert d["num_tokens"] == 32 and len(d["tokens_per_expert"]) == 4
    assert sum(d["tokens_per_expert"]) == 32 * 2 - d["dropped"]
    assert d["dropped_fraction"] == pytest.approx(d["dropped"] / 64)
    assert 0 <= d["router_entropy"] <= math.log(4) + 1e-6
    assert d["max_router_logit"] > 0
    assert out.routing.expert_idx.shape == (32, 2)


def test_stats_dead_experts_busiest_share_and_load_cv():
    s = RoutingStats(
        tokens_per_expert=torch.tensor([6, 2, 0, 0]),
        num_tokens=4,
        top_k=2,
        dropped=torch.tensor(0),
        router_entropy=torch.tensor(0.0),
        max_router_logit=torch.tensor(0.0),
    )
    assert int(s.dead_experts) == 2
    assert float(s.busiest_expert_share) == pytest.approx(6 / 8)
    load = torch.tensor([6.0, 2, 0, 0])
    assert float(s.load_cv) == pytest.approx(float(load.std(unbiased=False) / load.mean()))
    balanced = RoutingStats(
        tokens_per_expert=torch.tensor([2, 2, 2, 2]),
        num_tokens=4,
        top_k=2,
        dropped=torch.tensor(0),
        router_entropy=torch.tensor(0.0),
        max_router_logit=torch.tensor(0.0),
    )
    assert float(balanced.load_cv) == 0 and int(balanced.dead_experts) == 0
    assert float(balanced.busiest_expert_share) == pytest.approx(1 / 4)


def test_layer_counts_dead_experts_when_router_collapses():
    layer = MoE(MoEConfig(d_model=8, d_expert=4, num_experts=6, top_k=2))
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[:2, 0] = 10.0  # with x[:, 0] > 0 every token picks experts 0 and 1
    x = torch.randn(20, 8)
    x[:, 0] = x[:, 0].abs() + 1
    stats = layer(x).stats
    assert stats.tokens_per_expert.tolist() == [20, 20, 0, 0, 0, 0]
    assert int(stats.dead_experts) == 4
    assert float(stats.busiest_expert_share) == pytest.approx(0.5)
    assert float(stats.load_cv) > 1


def test_expert_choice_dropped_counts_unpicked_tokens():
    torch.manual_seed(0)
    cfg = MoEConfig(
        d_model=8,
        d_expert=4,
        num_experts=2,
        top_k=1,
        router="expert_choice",
        causal=False,
        capacity_factor=0.5,
    )
    out = MoE(cfg)(torch.randn(16, 8), return_routing=True)
    picked = out.routing.kept.any(-1)
    assert int(out.stats.dropped) == int((~picked).sum())
    assert out.stats.tokens_per_expert.tolist() == [4, 4]
