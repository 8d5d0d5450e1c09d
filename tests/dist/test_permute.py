"""The exchange's index maths (`moelab.dist.permute`): pure tensors, no processes."""

from __future__ import annotations

import pytest
import torch

from moelab.dist.permute import expert_major_order, expert_major_order_reference, inverse_permutation, rows_per_rank

CASES = {
    "random": torch.tensor([[3, 0, 2], [1, 4, 0]]),
    "zero_token_experts": torch.tensor([[0, 0, 5], [0, 0, 2]]),
    "all_on_one_expert": torch.tensor([[0, 7], [0, 0], [0, 0]]),
    "nothing": torch.zeros(2, 2, dtype=torch.long),
    "one_rank": torch.tensor([[2, 3, 1, 0]]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_expert_major_matches_reference_and_round_trips(name):
    counts_RL = CASES[name]
    perm = expert_major_order(counts_RL)
    assert torch.equal(perm, expert_major_order_reference(counts_RL))
    A = int(counts_RL.sum())
    assert sorted(perm.tolist()) == list(range(A))  # a permutation
    x = torch.randn(A, 3)
    assert torch.equal(x[perm][inverse_permutation(perm)], x)


@pytest.mark.parametrize("seed", range(5))
def test_expert_major_groups_rows_by_expert_then_rank(seed):
    g = torch.Generator().manual_seed(seed)
    R, L = 3, 4
    counts_RL = torch.randint(0, 4, (R, L), generator=g)
    # Label each rank-major row with its (expert, rank); expert-major order sorts by it.
    labels = torch.cat([torch.full((int(counts_RL[r, l]),), l * R + r) for r in range(R) for l in range(L)])
    ordered = labels[expert_major_order(counts_RL)]
    assert torch.equal(ordered, torch.sort(labels, stable=True).values)


def test_rows_per_rank_sums_each_ranks_experts():
    counts_E = torch.tensor([1, 2, 0, 4, 5, 0])
    assert rows_per_rank(counts_E, 3).tolist() == [3, 4, 5]
    assert rows_per_rank(counts_E, 1).tolist() == [12]
