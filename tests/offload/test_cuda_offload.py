"""Offloading on a GPU: the hot experts in GPU slots under the budget, every expert read
once into pinned CPU memory. The CUDA tests skip where there is no GPU (CI has none);
run them on a CUDA machine with ``pytest tests/offload/test_cuda_offload.py``."""

from __future__ import annotations

import pytest
import torch

from moelab.errors import ConfigError
from moelab.infer.generate import generate
from moelab.offload import load_offloaded
from moelab.rundir import load_model

from .conftest import EXPERT_BYTES

PROMPTS = [[5, 9, 1, 1, 2, 7], [11, 4], [12, 3, 3, 8, 5, 13, 0, 2, 15]]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def _exact_fp32():
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32: the resident model's tokens
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def test_an_unknown_or_absent_device_is_one_clear_error(run):
    _, run_dir = run
    with pytest.raises(ConfigError, match="device='mps' is not supported; allowed: cpu, cuda"):
        load_offloaded(run_dir, expert_memory=2 * EXPERT_BYTES, device="mps")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            load_offloaded(run_dir, expert_memory=2 * EXPERT_BYTES, device="cuda")


@cuda
@pytest.mark.parametrize("per_layer, prefetch", [(1, False), (2, False), (1, True), (4, False)])
def test_offloaded_generation_on_the_gpu_equals_the_resident_gpu_model(run, per_layer, prefetch, _exact_fp32):
    _, run_dir = run
    resident = load_model(run_dir).model.cuda()
    want = generate(resident, PROMPTS, max_new_tokens=10).token_ids
    del resident
    torch.cuda.empty_cache()
    off = load_offloaded(run_dir, expert_memory=2 * per_layer * EXPERT_BYTES, device="cuda", prefetch=prefetch)
    assert all(p.is_cuda for p in off.model.parameters())
    assert generate(off.model, PROMPTS, max_new_tokens=10).token_ids == want
    off.store.wait_prefetch()
    s = off.stats()
    assert s.device.startswith("cuda") and s.peak_resident_bytes <= 2 * per_layer * EXPERT_BYTES
    # Every expert is read from the file once, into the pinned host tier; later misses are copies.
    assert s.bytes_read + s.prefetch_bytes_read == s.host_bytes <= 2 * 4 * EXPERT_BYTES
    assert all(t.is_pinned() for t in off.store._host.values())
    assert all(slot.is_cuda for pool in off.store._pools for slot in pool.slots)
    off.store.close()


@cuda
def test_gpu_memory_holds_the_non_expert_weights_and_the_budget(run):
    _, run_dir = run
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    off = load_offloaded(run_dir, expert_memory=2 * EXPERT_BYTES, device="cuda")
    generate(off.model, PROMPTS, max_new_tokens=10)
    weights = off.non_expert_bytes()
    held = torch.cuda.memory_allocated() - base
    assert weights <= held <= weights + off.stats().peak_resident_bytes + (1 << 20)  # + KV/activations freed
    off.store.close()
