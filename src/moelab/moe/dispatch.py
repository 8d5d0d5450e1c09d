"""Dispatch: routing decisions -> the experts' input rows, grouped by expert, and back.

Legend: T tokens, D model dim, K experts per token, E experts, C capacity,
A kept (token, expert) assignments (T*K minus dropped for token choice, E*C for expert
choice).

The protocol every dispatcher implements (`Dispatcher`):

    dispatch(x_TD, route) -> Dispatched(x_AD, tokens_per_expert_E, weight_A, ...)
    combine(y_AD, dispatched) -> y_TD

``x_AD`` holds one row per kept assignment, expert 0's rows first, then expert 1's, and
so on (``tokens_per_expert_E`` says how many each), which is what a grouped GEMM or a
loop over slices wants. ``weight_A`` is each row's combine weight; the experts backend
folds it into its activation (a pass over ``[A, F]`` instead of ``[A, D]``), so
`combine` only sums each token's rows. Capacity and dropping are decided here.

`LocalDispatcher` (this process holds every expert) serves training, eager and compiled
inference alike. An expert-parallel dispatcher (all-to-all over torch.distributed) is a
second implementation of the same protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from moelab.moe import routing
from moelab.moe.router import RouterOutput


@dataclass(frozen=True)
class Dispatched:
    """The experts' input and what `combine` needs to put their output back."""

    x_AD: torch.Tensor  # one row per kept assignment, grouped by expert in expert order
    tokens_per_expert_E: torch.Tensor  # rows per expert (long); sums to A
    weight_A: torch.Tensor  # combine weight of each row (carries the router's gradient)
    token_idx_A: torch.Tensor  # the token each row came from
    num_tokens: int
    dropped: torch.Tensor  # [] long: dropped assignments (token choice) or unpicked tokens (expert choice)
    keep_TK: torch.Tensor | None = None  # token choice with a capacity: which assignments were kept


class Dispatcher(Protocol):
    def dispatch(self, x_TD: torch.Tensor, route: RouterOutput) -> Dispatched: ...

    def combine(self, y_AD: torch.Tensor, dispatched: Dispatched) -> torch.Tensor: ...


Assignments = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (token_A, expert_A, weight_A)


def assignments_token_choice(
    expert_idx_TK: torch.Tensor, weights_TK: torch.Tensor, keep_TK: torch.Tensor | None = None
) -> Assignments:
    """Flatten token-choice routing; ``keep_TK`` (from capacity) marks the kept assignments."""
    T, K = expert_idx_TK.shape
    token_A = torch.arange(T, device=expert_idx_TK.device).repeat_interleave(K)
    expert_A = expert_idx_TK.reshape(-1)
    weight_A = weights_TK.reshape(-1)
    if keep_TK is not None:
        keep_A = keep_TK.reshape(-1)
        token_A, expert_A, weight_A = token_A[keep_A], expert_A[keep_A], weight_A[keep_A]
    return token_A, expert_A, weight_A


def assignments_expert_choice(token_idx_EC: torch.Tensor, weights_EC: torch.Tensor) -> Assignments:
    """Flatten expert-choice routing: expert e owns row e, C tokens each."""
    E, C = token_idx_EC.shape
    expert_A = torch.arange(E, device=token_idx_EC.device).repeat_interleave(C)
    return token_idx_EC.reshape(-1), expert_A, weights_EC.reshape(-1)


def count_per_expert(expert_A: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments per expert, ``[E]`` long."""
    if torch.compiler.is_compiling():
        # By comparison, not bincount: bincount's output size depends on the data, which
        # a compiled graph cannot have.
        return (expert_A.unsqueeze(1) == torch.arange(num_experts, device=expert_A.device)).sum(0)
    return torch.bincount(expert_A, minlength=num_experts)


# ATen runs index_select/index_add_ with OpenMP once an op has more than 32768 elements
# (at::internal::GRAIN_SIZE). For decode-sized ops that costs more than the work, and on a
# shared 2-core machine a worker that is descheduled stalls the op for a whole scheduler
# tick: a [128, 512] index_add_ took 140 ms with 2 threads vs 11 us with 1 (measured
# here). Small gathers/scatters are therefore issued in pieces below the grain size,
# which ATen runs serially; large ones stay one call (the work dwarfs the sync). At most
# 4 pieces: at training shapes (tiny-moe, ~700-row chunks of D=128) 16 pieces of 128
# rows cost ~1 ms more per layer fwd+bwd than one parallel call (measured, interleaved).
_SERIAL_ELEMS = 16384
_MAX_PIECES = 4


def _row_pieces(num_rows: int, row_elems: int) -> list[tuple[int, int]] | None:
    """Row ranges that each stay below the parallel grain, or None for one call."""
    rows = max(1, _SERIAL_ELEMS // max(1, row_elems))
    if num_rows <= rows or num_rows > rows * _MAX_PIECES:
        return None
    return [(i, min(i + rows, num_rows)) for i in range(0, num_rows, rows)]


def gather_rows(x_TD: torch.Tensor, idx_R: torch.Tensor) -> torch.Tensor:
    """``x_TD[idx_R]`` (no autograd), in serial pieces when that is faster (see above)."""
    pieces = _row_pieces(idx_R.shape[0], x_TD.shape[1])
    if pieces is None:
        return x_TD.index_select(0, idx_R)
    out_RD = x_TD.new_empty(idx_R.shape[0], x_TD.shape[1])
    for a, b in pieces:
        torch.index_select(x_TD, 0, idx_R[a:b], out=out_RD[a:b])
    return out_RD


def scatter_add_rows(out_TD: torch.Tensor, idx_R: torch.Tensor, y_RD: torch.Tensor) -> None:
    """``out_TD[idx_R] += y_RD`` in place, rows in order (deterministic sums)."""
    pieces = _row_pieces(idx_R.shape[0], y_RD.shape[1])
    if pieces is None:
        out_TD.index_add_(0, idx_R, y_RD)
        return
    for a, b in pieces:
        out_TD.index_add_(0, idx_R[a:b], y_RD[a:b])


class _Gather(torch.autograd.Function):
    """``x_TD[idx_A]``; backward scatter-adds the rows' gradients back to their tokens."""

    @staticmethod
    def forward(ctx, x_TD, idx_A):
        ctx.save_for_backward(idx_A)
        ctx.num_tokens = x_TD.shape[0]
        return gather_rows(x_TD, idx_A)

    @staticmethod
    def backward(ctx, g_AD):
        (idx_A,) = ctx.saved_tensors
        dx_TD = g_AD.new_zeros(ctx.num_tokens, g_AD.shape[1])
        scatter_add_rows(dx_TD, idx_A, g_AD.contiguous())
        return dx_TD, None


class _Combine(torch.autograd.Function):
    """``y_TD[t] = sum of the rows of token t``; backward gathers the tokens' gradients."""

    @staticmethod
    def forward(ctx, y_AD, idx_A, num_tokens):
        ctx.save_for_backward(idx_A)
        out_TD = y_AD.new_zeros(num_tokens, y_AD.shape[1])
        scatter_add_rows(out_TD, idx_A, y_AD)
        return out_TD

    @staticmethod
    def backward(ctx, g_TD):
        (idx_A,) = ctx.saved_tensors
        return gather_rows(g_TD.contiguous(), idx_A), None, None


class LocalDispatcher:
    """Every expert in this process: sort the assignments by expert, gather, scatter-add.

    Token choice with ``capacity_factor`` keeps each expert's ``C = ceil(cf * T * K / E)``
    highest-priority assignments (`routing.capacity_keep_mask`) and drops the rest: a
    dropped assignment gets nothing from the MoE branch (the residual carries the token).
    """

    def __init__(self, num_experts: int, top_k: int, capacity_factor: float | None, drop_policy: str):
        self.num_experts, self.top_k = num_experts, top_k
        self.capacity_factor, self.drop_policy = capacity_factor, drop_policy

    def dispatch(self, x_TD: torch.Tensor, route: RouterOutput) -> Dispatched:
        T, E = x_TD.shape[0], self.num_experts
        keep_TK = None
        if route.is_expert_choice:
            token_A, expert_A, weight_A = assignments_expert_choice(route.token_idx_EC, route.weights_EC)
            picked_T = torch.zeros(T, dtype=torch.long, device=x_TD.device).index_add_(
                0, token_A, torch.ones_like(token_A)
            )
            dropped = (picked_T == 0).sum()
        else:
            if self.capacity_factor is not None:
                capacity = routing.expert_capacity(T, E, self.top_k, self.capacity_factor)
                keep_TK = routing.capacity_keep_mask(
                    route.expert_idx_TK, route.weights_TK, E, capacity, self.drop_policy
                )
            token_A, expert_A, weight_A = assignments_token_choice(route.expert_idx_TK, route.weights_TK, keep_TK)
            dropped = (~keep_TK).sum() if keep_TK is not None else torch.zeros((), dtype=torch.long)
        # Stable: tokens keep their order inside each expert, so sums are deterministic.
        order_A = torch.argsort(expert_A, stable=True)
        counts_E = count_per_expert(expert_A, E)
        token_A, weight_A = token_A[order_A], weight_A[order_A]
        if torch.compiler.is_compiling():
            x_AD = x_TD[token_A]  # traced: inductor fuses it into its own kernel
        else:
            x_AD = _Gather.apply(x_TD, token_A)
        return Dispatched(x_AD, counts_E, weight_A, token_A, T, dropped, keep_TK)

    def combine(self, y_AD: torch.Tensor, dispatched: Dispatched) -> torch.Tensor:
        if torch.compiler.is_compiling():
            out_TD = y_AD.new_zeros(dispatched.num_tokens, y_AD.shape[1])
            return out_TD.index_add_(0, dispatched.token_idx_A, y_AD)
        return _Combine.apply(y_AD, dispatched.token_idx_A, dispatched.num_tokens)
