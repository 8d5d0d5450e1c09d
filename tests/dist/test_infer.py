"""Greedy generation with the experts over 2 processes equals one process's."""

from __future__ import annotations

import torch

from moelab.infer.generate import generate

from .conftest import load_worker

worker = load_worker()


def test_generate_over_two_ranks_equals_one_process(ranks):
    want = generate(worker.generation_model(), worker.PROMPTS, max_new_tokens=6).token_ids
    for r in range(2):
        got = torch.load(ranks / f"generate.rank{r}.pt")["tokens"]
        assert got == want, (r, got, want)
