"""Next-layer prefetch: the same tokens as resident, the budget kept, stats that add up,
and a prefetch never overwriting a pool the forward is reading."""

from __future__ import annotations

import pytest
import torch

from moelab.errors import ConfigError
from moelab.infer.generate import generate
from moelab.moe import MoE
from moelab.offload import ExpertStore, expert_layouts, load_offloaded
from moelab.rundir import load_model, save_model

from .conftest import EXPERT_BYTES, random_model, tiny_cfg

PROMPTS = [[5, 9, 1, 1, 2, 7], [11, 4], [12, 3, 3, 8, 5, 13, 0, 2, 15]]


def _three_moe_layers(tmp_path, **moe):
    cfg = tiny_cfg(**moe).with_(n_layers=4)  # one dense layer, then three MoE layers
    return save_model(random_model(cfg), tmp_path / "run")


@pytest.mark.parametrize("per_layer, impl", [(1, "grouped"), (2, "grouped"), (2, "loop"), (4, "grouped")])
def test_prefetched_generation_equals_the_resident_model(tmp_path, per_layer, impl):
    run_dir = _three_moe_layers(tmp_path, impl=impl)
    resident = load_model(run_dir).model
    off = load_offloaded(run_dir, expert_memory=3 * per_layer * EXPERT_BYTES, prefetch=True)
    moes = [m for m in off.model.modules() if isinstance(m, MoE)]
    assert [m.experts.next_router[1] if m.experts.next_router else None for m in moes] == [1, 2, None]
    assert not any("next_router" in n or n.count("router") > 1 for n in off.model.state_dict())  # not a child
    for prompts in (PROMPTS, PROMPTS[:1]):
        want = generate(resident, prompts, max_new_tokens=12).token_ids
        assert generate(off.model, prompts, max_new_tokens=12).token_ids == want
    off.store.wait_prefetch()
    s = off.stats()
    assert s.peak_resident_bytes <= 3 * per_layer * EXPERT_BYTES  # prefetches count in the budget
    # How many guesses load before the forward gets there is a race with the thread (the
    # unit tests below pin the mechanics down); what holds whatever the timing:
    assert s.prefetch_bytes_read == s.prefetched * EXPERT_BYTES
    assert s.prefetch_used + s.prefetch_wasted <= s.prefetched
    assert s.bytes_read == s.misses * EXPERT_BYTES  # demand reads only
    if per_layer == 4:  # all resident: a prefetched expert is never evicted
        assert s.prefetch_wasted == 0 and s.evictions == 0
    off.store.close()


def test_a_prefetch_for_a_pool_in_use_is_dropped(run):
    _, run_dir = run
    model = random_model(tiny_cfg())
    store = ExpertStore(run_dir / "model.safetensors", expert_layouts(model), expert_memory=2 * EXPERT_BYTES,
                        prefetch=True)
    w_in, _ = store.get(0, 1)
    before = w_in.clone()
    with store.using(0):  # the forward reads layer 0's one slot: expert 1
        store.prefetch(0, [2])
        store.wait_prefetch()
        assert torch.equal(w_in, before) and store.resident(0) == [1]
    s = store.stats()
    assert s.prefetch_dropped == 1 and s.prefetched == 0
    store.prefetch(0, [2])  # the pool is free again: expert 2 replaces expert 1
    store.wait_prefetch()
    assert store.resident(0) == [2] and store.stats().prefetched == 1
    store.get(0, 2)
    assert store.stats().prefetch_used == 1 and store.stats().misses == 1  # the first get(0, 1)
    store.close()


def test_an_evicted_prefetch_counts_as_wasted(run):
    _, run_dir = run
    model = random_model(tiny_cfg())
    store = ExpertStore(run_dir / "model.safetensors", expert_layouts(model), expert_memory=2 * EXPERT_BYTES,
                        prefetch=True)
    store.prefetch(1, [3])
    store.wait_prefetch()
    store.get(1, 0)  # a miss that evicts the unused prefetch
    s = store.stats()
    assert (s.prefetched, s.prefetch_used, s.prefetch_wasted, s.misses) == (1, 0, 1, 1)
    store.close()


def test_prefetch_needs_per_layer_pools(run):
    _, run_dir = run
    with pytest.raises(ConfigError, match="prefetch needs scope='layer'"):
        load_offloaded(run_dir, expert_memory=4 * EXPERT_BYTES, scope="global", prefetch=True)


def test_without_prefetch_nothing_is_loaded_ahead(run):
    _, run_dir = run
    off = load_offloaded(run_dir, expert_memory=2 * EXPERT_BYTES)
    assert all(m.experts.next_router is None for m in off.model.modules() if isinstance(m, MoE))
    off.store.prefetch(0, [1])  # a no-op
    generate(off.model, PROMPTS, max_new_tokens=4)
    s = off.stats()
    assert s.prefetched == s.prefetch_dropped == 0
