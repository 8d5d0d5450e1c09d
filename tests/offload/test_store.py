"""The expert store: the budget always holds, the policies evict what they should, the
stats add up, the weights read are the checkpoint's."""

from __future__ import annotations

import random

import pytest
import torch

from moelab.errors import ConfigError
from moelab.offload import ExpertStore, LFUPolicy, LRUPolicy, expert_layouts

from .conftest import EXPERT_BYTES


def _store(run, experts: int, **kw) -> ExpertStore:
    model, run_dir = run
    return ExpertStore(run_dir / "model.safetensors", expert_layouts(model), expert_memory=experts * EXPERT_BYTES, **kw)


@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("scope, budget", [("layer", 2), ("layer", 5), ("global", 1), ("global", 3), ("global", 8)])
def test_the_store_never_holds_more_than_its_budget_and_its_stats_add_up(run, policy, scope, budget):
    store = _store(run, budget, policy=policy, scope=scope)
    rng = random.Random(budget)
    for i in range(200):
        layer, e = rng.randrange(2), rng.choice([0, 0, 0, 1, 1, 2, 3])  # skewed, like routing
        store.get(layer, e)
        s = store.stats()
        assert store.resident_bytes <= budget * EXPERT_BYTES and s.peak_resident_bytes <= budget * EXPERT_BYTES
        assert s.hits + s.misses == s.accesses == i + 1
        assert s.bytes_read == s.misses * EXPERT_BYTES
        assert s.evictions == s.misses - s.resident_bytes // EXPERT_BYTES
    assert s.slots == (2 * min(budget // 2, 4) if scope == "layer" else min(budget, 8))
    assert 0 < s.hit_rate < 1 or budget == 8


def test_the_weights_are_the_checkpoints(run):
    model, _ = run
    store = _store(run, 2)
    for layer, block in ((0, 1), (1, 2)):
        experts = model.layers[block].mlp.experts
        for e in (3, 0, 3):
            w_in, w_out = store.get(layer, e)
            assert torch.equal(w_in, experts.gate_up_proj[e]) and torch.equal(w_out, experts.down_proj[e])


def test_lru_evicts_the_least_recently_used(run):
    store = _store(run, 4)  # two slots per layer
    for e in (0, 1, 0, 2):  # 2 evicts 1 (0 was used after it)
        store.get(0, e)
    assert store.resident(0) == [0, 2] and store.resident(1) == []
    store.get(0, 3)  # evicts 0
    assert store.resident(0) == [2, 3]
    s = store.stats()
    assert (s.hits, s.misses, s.evictions) == (1, 4, 2)


def test_lfu_evicts_the_least_frequently_used_counting_past_visits(run):
    store = _store(run, 4, policy="lfu")
    for e in (0, 0, 0, 1, 2):  # 2 evicts 1 (count 1 vs 0's 3; tie 1 vs 2 -> older)
        store.get(0, e)
    assert store.resident(0) == [0, 2]
    for e in (1, 1):  # 1 comes back (count 2 now) and evicts 2; then hits
        store.get(0, e)
    assert store.resident(0) == [0, 1]
    store.get(0, 2)  # 0 and 1 both have 3 accesses: the tie evicts 0, the less recent
    assert store.resident(0) == [1, 2]
    s = store.stats()
    assert (s.hits, s.misses, s.evictions) == (3, 5, 3)


def test_policies_alone():
    lru, lfu = LRUPolicy(), LFUPolicy()
    for p in (lru, lfu):
        for k in "abc":
            p.on_insert(k)
    lru.on_hit("a")
    assert lru.victim() == "b"
    lfu.on_hit("c"), lfu.on_hit("c"), lfu.on_hit("a")
    assert lfu.victim() == "b"
    lfu.on_evict("b")
    assert lfu.victim() == "a"  # a: 2 accesses, c: 3


def test_a_global_pool_is_shared_by_the_layers(run):
    store = _store(run, 2, scope="global")
    store.get(0, 0), store.get(1, 0), store.get(1, 1)  # the third evicts layer 0's expert
    assert store.resident(0) == [] and store.resident(1) == [0, 1]


def test_dropping_the_page_cache_reads_the_same_weights(run):
    """``page_cache="drop"`` (benchmarks/memory.py --cold) changes where a miss reads from,
    never what it reads."""
    model, run_dir = run
    keep = _store(run, 8)
    drop = _store(run, 8, page_cache="drop")
    drop.file.drop_cached_pages()
    for layer in range(len(keep.layouts)):
        for e in range(keep.layouts[layer].num_experts):
            a, b = keep.get(layer, e), drop.get(layer, e)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert drop.stats().bytes_read == keep.stats().bytes_read > 0
    with pytest.raises(ConfigError, match="page_cache='never' is not allowed"):
        _store(run, 8, page_cache="never")
