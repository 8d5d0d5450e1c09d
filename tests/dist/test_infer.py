"""Greedy generation with the experts over 2 processes equals one process's."""

from __future__ import annotations

import pytest
import torch

from moelab.infer.generate import generate

from .conftest import HERE, env, load_worker

worker = load_worker()


def test_generate_over_two_ranks_equals_one_process(ranks):
    want = generate(worker.generation_model(), worker.PROMPTS, max_new_tokens=6).token_ids
    for r in range(2):
        got = torch.load(ranks / f"generate.rank{r}.pt")["tokens"]
        assert got == want, (r, got, want)


@pytest.mark.slow
def test_compiled_decode_over_two_ranks_equals_one_process(tmp_path):
    """``generate(compile=True)`` over EP: the decode step is one graph (fullgraph) with each
    layer's exchange as an opaque op; the tokens are one eager process's."""
    from moelab.dist.launch import launch

    launch([str(HERE / "ep_worker.py"), str(tmp_path), "generate_compiled"], 2, timeout_s=400, env=env())
    want = generate(worker.generation_model(), worker.PROMPTS, max_new_tokens=6).token_ids
    for r in range(2):
        got = torch.load(tmp_path / f"generate_compiled.rank{r}.pt")
        assert got["tokens"] == want, (r, got["tokens"], want)
        assert got["extras"]["compile_s"] > 0  # the compiled path ran
