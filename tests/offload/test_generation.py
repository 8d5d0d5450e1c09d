"""Offloaded generation gives exactly the resident model's tokens; the fused path equals
the loop reference and the resident experts."""

from __future__ import annotations

import pytest
import torch

from moelab.infer.generate import generate
from moelab.moe import MoE, RoutedExperts
from moelab.moe.dispatch import LocalDispatcher
from moelab.moe.router import RouterOutput
from moelab.offload import ExpertStore, OffloadedExperts, expert_layouts, load_offloaded
from moelab.rundir import load_model, save_model

from .conftest import EXPERT_BYTES, random_model, tiny_cfg

PROMPTS = [[5, 9, 1, 1, 2, 7], [11, 4], [12, 3, 3, 8, 5, 13, 0, 2, 15]]


@pytest.mark.parametrize("per_layer, policy, scope", [(1, "lru", "layer"), (2, "lfu", "layer"),
                                                      (1, "lru", "global"), (4, "lru", "layer")])
def test_offloaded_greedy_generation_equals_the_resident_model(run, per_layer, policy, scope):
    _, run_dir = run
    resident = load_model(run_dir).model
    off = load_offloaded(run_dir, expert_memory=2 * per_layer * EXPERT_BYTES, policy=policy, scope=scope)
    assert all(isinstance(m.experts, OffloadedExperts) for m in off.model.modules() if isinstance(m, MoE))
    for prompts in (PROMPTS, PROMPTS[:1]):  # batched prefill + decode, and one row (the one-token path)
        want = generate(resident, prompts, max_new_tokens=10).token_ids
        assert generate(off.model, prompts, max_new_tokens=10).token_ids == want
    s = off.stats()
    assert s.hits + s.misses == s.accesses > 0 and s.bytes_read == s.misses * EXPERT_BYTES
    assert s.peak_resident_bytes <= 2 * per_layer * EXPERT_BYTES
    if per_layer == 4:  # everything fits: each expert read once
        assert s.misses <= 8 and s.evictions == 0


def test_the_loop_reference_generates_the_same_tokens(tmp_path):
    model = random_model(tiny_cfg(impl="loop"))
    run_dir = save_model(model, tmp_path / "run")
    off = load_offloaded(run_dir, expert_memory=2 * EXPERT_BYTES)
    assert off.model.layers[1].mlp.experts.backend(torch.zeros(1, 1)).forward_gathered is None  # unfused
    want = generate(load_model(run_dir).model, PROMPTS, max_new_tokens=8).token_ids
    assert generate(off.model, PROMPTS, max_new_tokens=8).token_ids == want


def test_the_model_holds_no_expert_weights(run):
    model, run_dir = run
    off = load_offloaded(run_dir, expert_memory=2 * EXPERT_BYTES)
    assert not any(".experts." in name for name in off.model.state_dict())
    expert_numel = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert off.non_expert_bytes() == sum(t.numel() * 4 for t in model.state_dict().values()) - expert_numel * 4
    assert off.store.resident_bytes == 0  # nothing read before the first forward


@pytest.mark.parametrize("T", [1, 7])
def test_fused_path_equals_the_loop_and_the_resident_experts_float64(tmp_path, T):
    model = random_model(tiny_cfg()).double()
    run_dir = save_model(model, tmp_path / "run")
    layouts = expert_layouts(model)
    store = ExpertStore(run_dir / "model.safetensors", layouts, expert_memory=2 * EXPERT_BYTES * 2,
                        dtype=torch.float64)
    resident: RoutedExperts = model.layers[2].mlp.experts
    fused, loop = OffloadedExperts(store, 1), OffloadedExperts(store, 1, impl="loop")
    g = torch.Generator().manual_seed(T)
    x_TD = torch.randn(T, 32, generator=g, dtype=torch.float64)
    idx_TK = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(T)])
    w_TK = torch.rand(T, 2, generator=g, dtype=torch.float64)
    route = RouterOutput(logits_TE=torch.zeros(T, 4, dtype=torch.float64), probs_TE=torch.zeros(T, 4),
                         expert_idx_TK=idx_TK, weights_TK=w_TK)
    dispatcher = LocalDispatcher(4, 2, None, "probability")
    with torch.no_grad():
        d = dispatcher.dispatch(x_TD, route)
        want = dispatcher.run_experts(resident, d)
        for experts in (fused, loop):
            torch.testing.assert_close(dispatcher.run_experts(experts, d), want, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(experts(d.x_AD, d.tokens_per_expert_E, d.weight_A),
                                       resident(d.x_AD, d.tokens_per_expert_E, d.weight_A), rtol=1e-12, atol=1e-12)
