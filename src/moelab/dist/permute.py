"""The index maths of the all-to-all exchange, as pure functions (no process group).

Legend: R ranks of the ep group, L experts per rank (E = R * L), A rows.

After the token exchange a rank holds its rows **rank-major**: every row from source rank
0 (its L local experts' rows in expert order), then rank 1's, ... The experts backend wants
them **expert-major**: local expert 0's rows from every rank, then expert 1's. With
``counts_RL[r, l]`` rows from rank r for local expert l, `expert_major_order` gives the
permutation ``perm_A`` with ``x_expert_major = x_rank_major[perm_A]``; its inverse undoes
it. Inside each (rank, expert) block the rows keep their order, so expert l sees rank 0's
tokens before rank 1's: the order a single process sees over the concatenated batch.
"""

from __future__ import annotations

import torch


def expert_major_order(counts_RL: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """``perm_A``: rank-major row index of each expert-major row (long, ``[sum(counts)]``).

    ``total`` (the number of rows, when the caller knows it as a Python int) saves the
    host sync of reading ``counts_RL.sum()``."""
    R, L = counts_RL.shape
    counts = counts_RL.reshape(-1).to(torch.long)
    starts_RL = (torch.cumsum(counts, 0) - counts).view(R, L)  # where each block begins, rank-major
    counts_LR = counts_RL.t().reshape(-1).to(torch.long)  # blocks in expert-major order
    starts_LR = starts_RL.t().reshape(-1)
    A = int(counts.sum()) if total is None else total
    block_start_A = torch.repeat_interleave(starts_LR, counts_LR, output_size=A)
    offset_in_block_A = torch.arange(A, device=counts.device) - torch.repeat_interleave(
        torch.cumsum(counts_LR, 0) - counts_LR, counts_LR, output_size=A)
    return block_start_A + offset_in_block_A


def expert_major_order_reference(counts_RL: torch.Tensor) -> torch.Tensor:
    """The same permutation by a readable double loop (the test's reference)."""
    R, L = counts_RL.shape
    start, starts = 0, {}
    for r in range(R):
        for l in range(L):
            starts[r, l] = start
            start += int(counts_RL[r, l])
    rows = [torch.arange(starts[r, l], starts[r, l] + int(counts_RL[r, l])) for l in range(L) for r in range(R)]
    return torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)


def inverse_permutation(perm_A: torch.Tensor) -> torch.Tensor:
    """``inv`` with ``x[perm][inv] == x``."""
    inv = torch.empty_like(perm_A)
    inv[perm_A] = torch.arange(perm_A.numel(), device=perm_A.device)
    return inv


def rows_per_rank(counts_E: torch.Tensor, ep_size: int) -> torch.Tensor:
    """Rows this rank sends to each rank, ``[R]``, from its rows per (global) expert ``[E]``:
    rank r holds experts r*L .. (r+1)*L - 1."""
    return counts_E.view(ep_size, -1).sum(1)
