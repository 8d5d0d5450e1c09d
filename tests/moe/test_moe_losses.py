"""Aux losses and the aux-loss-free bias update."""

from __future__ import annotations

import pytest
import torch

from moelab.moe import MoE, MoEConfig
from moelab.moe.losses import load_balancing_loss, router_z_loss, update_expert_bias


def test_load_balancing_loss_is_one_for_uniform_routing():
    T, E = 8, 4
    probs = torch.full((T, E), 1.0 / E)
    idx = torch.tensor([[t % E, (t + 1) % E] for t in range(T)])  # K=2: every expert gets T*K/E
    torch.testing.assert_close(load_balancing_loss(probs, idx, E), torch.tensor(1.0))


def test_load_balancing_loss_above_one_when_collapsed():
    T, E = 8, 4
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).expand(T, E)
    idx = torch.zeros(T, 1, dtype=torch.long)
    loss = load_balancing_loss(probs, idx, E)
    torch.testing.assert_close(loss, torch.tensor(E * 0.7))  # f = (1,0,0,0), P = probs[0]
    assert float(loss) > 1


def test_sequence_wise_loss_differs_from_batch_wise():
    """Two sequences each collapsed on a different expert: balanced as a batch, not per sequence."""
    S, E = 4, 2
    probs = torch.cat(
        [torch.tensor([[1.0, 0.0]]).expand(S, E), torch.tensor([[0.0, 1.0]]).expand(S, E)]
    )
    idx = torch.cat([torch.zeros(S, 1), torch.ones(S, 1)]).long()
    batch = load_balancing_loss(probs, idx, E)
    seq = load_balancing_loss(probs, idx, E, seq_len=S)
    torch.testing.assert_close(batch, torch.tensor(1.0))
    torch.testing.assert_close(seq, torch.tensor(2.0))
    with pytest.raises(ValueError, match="whole number of sequences"):
        load_balancing_loss(probs, idx, E, seq_len=3)


def test_layer_uses_sequence_wise_loss_when_configured():
    torch.manual_seed(0)
    x = torch.randn(3, 10, 8)
    batch = MoE(MoEConfig(d_model=8, d_expert=4, num_experts=4))
    seq = MoE(MoEConfig(d_model=8, d_expert=4, num_experts=4, seq_aux_loss=True))
    seq.load_state_dict(batch.state_dict())
    expect = load_balancing_loss(*_probs_idx(batch, x), 4, seq_len=10)
    torch.testing.assert_close(seq(x).aux_loss, expect)
    assert not torch.allclose(batch(x).aux_loss, expect)


def _probs_idx(layer: MoE, x: torch.Tensor):
    logits = layer.router.logits(x.reshape(-1, 8))
    probs = torch.softmax(logits, -1)
    return probs, probs.topk(2, -1).indices


def test_load_balancing_loss_times_k_equals_hf():
    """HF's `load_balancing_loss_func` divides the routed counts by T (they sum to K), we
    divide by T*K (they sum to 1, so balanced = 1 for every K): ours * K == HF's, for one layer."""
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    torch.manual_seed(0)
    T, E, K = 64, 8, 2
    logits = torch.randn(T, E) * 2
    probs = torch.softmax(logits, -1)
    idx = probs.topk(K, -1).indices
    ours = load_balancing_loss(probs, idx, E)
    hf = mixtral.load_balancing_loss_func((logits,), num_experts=E, top_k=K)
    torch.testing.assert_close(ours * K, hf)


def test_router_z_loss_formula():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    lse = torch.log(torch.exp(logits).sum(-1))
    torch.testing.assert_close(router_z_loss(logits), (lse**2).mean())
    assert float(router_z_loss(10 * logits)) > float(router_z_loss(logits))


def test_update_expert_bias_direction():
    bias = torch.zeros(4)
    load = torch.tensor(
        [10, 2, 6, 6]
    )  # mean 6: expert 0 over, 1 under, 2 and 3 exactly at the mean
    new = update_expert_bias(bias, load, rate=0.01)
    torch.testing.assert_close(new, torch.tensor([-0.01, 0.01, 0.0, 0.0]))
    assert torch.equal(bias, torch.zeros(4))  # input not modified


def test_layer_update_bias_moves_load_toward_balance():
    torch.manual_seed(0)
    layer = MoE(
        MoEConfig(
            d_model=8, d_expert=4, num_experts=4, top_k=1, router="sigmoid", bias_update_rate=0.002
        )
    )
    layer.reset_parameters(std=0.5)
    x = torch.randn(128, 8)
    with torch.no_grad():
        layer.router.weight[0] += 0.5  # make expert 0 popular
        load0 = layer(x).stats.tokens_per_expert
        busiest = int(load0.argmax())
        layer.update_bias(load0)
        assert float(layer.router.expert_bias[busiest]) < 0  # busiest expert: less attractive
        for _ in range(15):
            layer.update_bias(layer(x).stats.tokens_per_expert)
        load1 = layer(x).stats.tokens_per_expert
    assert int(load1.max()) < int(load0.max())
    # Softmax router: update_bias is a no-op (no bias buffer).
    soft = MoE(MoEConfig(d_model=8, d_expert=4, num_experts=4, bias_update_rate=0.05))
    soft.update_bias(torch.tensor([4, 0, 0, 0]))


def test_losses_of_an_empty_batch_are_zero_not_nan():
    probs = torch.zeros(0, 4, requires_grad=True)
    assert float(load_balancing_loss(probs, torch.zeros(0, 2, dtype=torch.long), 4)) == 0.0
    assert float(router_z_loss(torch.zeros(0, 4))) == 0.0
