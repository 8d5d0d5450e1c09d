"""`moelab size --ep`: all-to-all bytes per token and weights per rank."""

from __future__ import annotations

import json

import pytest

from moelab.accounting import count_params, resolve, size_report
from moelab.accounting.parallel import all_to_all_bytes_per_token, expert_parallel_report
from moelab.cli.main import main
from moelab.errors import ConfigError


def test_deepseek_v3_over_ep_8():
    spec, _, _ = resolve("deepseek-v3")
    counts = count_params(spec)
    r = expert_parallel_report(spec, counts, ep=8, nodes=2)
    (group,) = r["moe_layers"]
    # K=8 rows of D=7168 bf16 values out (dispatch) and back (combine).
    assert group["all_to_all_bytes_per_token"] == 2 * 8 * 7168 * 2 == 229_376
    assert group["experts_per_rank"] == 256 // 8
    assert group["cross_rank_bytes_per_token"] == pytest.approx(229_376 * 7 / 8)
    assert group["cross_node_bytes_per_token"] == pytest.approx(229_376 / 2)
    assert r["all_to_all_bytes_per_token"] == 229_376 * len(group["layers"])
    assert r["training_all_to_all_bytes_per_token"] == 2 * r["all_to_all_bytes_per_token"]
    assert r["expert_params_per_rank"] * 8 == counts.routed_experts
    assert r["replicated_params_per_rank"] + counts.routed_experts == counts.total


@pytest.mark.parametrize("ep", [1, 2, 4, 8])
def test_weights_per_rank_add_up(ep):
    spec, _, _ = resolve("tiny-moe")
    counts = count_params(spec)
    r = expert_parallel_report(spec, counts, ep=ep)
    assert r["bytes_per_rank"]["bf16"] == (counts.total - counts.routed_experts + counts.routed_experts / ep) * 2
    assert r["moe_layers"][0]["cross_rank_bytes_per_token"] == pytest.approx(
        all_to_all_bytes_per_token(2, 128) * (ep - 1) / ep)


@pytest.mark.parametrize(("ep", "nodes", "match"), [
    (3, 1, "--ep 3: layers .* have 8 experts"),
    (0, 1, "--ep must be an integer >= 1"),
    (4, 3, "--nodes must be an integer >= 1 that divides --ep 4"),
])
def test_bad_ep_is_named(ep, nodes, match):
    spec, _, _ = resolve("tiny-moe")
    with pytest.raises(ConfigError, match=match):
        expert_parallel_report(spec, count_params(spec), ep=ep, nodes=nodes)


def test_dense_model_has_nothing_to_spread():
    spec, _, _ = resolve("tiny-dense")
    with pytest.raises(ConfigError, match="no MoE layer"):
        size_report(spec, ep=2)


def test_cli_json_and_table(capsys):
    assert main(["size", "mixtral-8x7b", "--ep", "4", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)["expert_parallel"]
    assert r["moe_layers"][0]["all_to_all_bytes_per_token"] == 2 * 2 * 4096 * 2
    assert main(["size", "mixtral-8x7b", "--ep", "4"]) == 0
    assert "all-to-all per token, per MoE layer" in capsys.readouterr().out
    assert main(["size", "mixtral-8x7b"]) == 0
    assert "expert parallelism" not in capsys.readouterr().out
