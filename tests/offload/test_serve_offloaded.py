"""An offloaded model behind the serving engine and its metrics."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from moelab.infer.generate import generate
from moelab.offload import load_offloaded
from moelab.serve.engine import Engine, EngineConfig, run_to_completion
from moelab.serve.metrics import ServerMetrics
from moelab.serve.types import GenerationRequest

from .conftest import EXPERT_BYTES


def test_offloaded_model_serves_the_resident_tokens(run):
    model, run_dir = run
    off = load_offloaded(run_dir, expert_memory=2 * EXPERT_BYTES)  # one expert per MoE layer
    engine = Engine(off.model, EngineConfig(max_num_seqs=3, max_len=64))
    prompts = [[3, 4, 5], [9, 1, 2, 7, 8, 6], [11]]
    reqs = [GenerationRequest(prompt_ids=tuple(p), max_tokens=8) for p in prompts]
    events = run_to_completion(engine, reqs)
    for r, p in zip(reqs, prompts, strict=True):
        got = [t for e in events[r.request_id] for t in e.token_ids]
        assert got == generate(model, [p], max_new_tokens=8).token_ids[0]
    s = off.stats()
    assert s.misses > 0 and s.peak_resident_bytes <= 2 * EXPERT_BYTES
    fams = {f.name: f for f in text_string_to_metric_families(ServerMetrics(engine, off.store).render().decode())}
    hits = fams["moelab_serve_offload_hits"].samples[0].value
    misses = fams["moelab_serve_offload_misses"].samples[0].value
    assert (hits, misses) == (s.hits, s.misses)
    assert fams["moelab_serve_offload_resident_bytes"].samples[0].value == pytest.approx(off.stats().resident_bytes)
