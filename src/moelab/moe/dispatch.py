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

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from moelab.moe import routing, traced
from moelab.moe.cpu_kernels import gather_rows, scatter_add_rows
from moelab.moe.losses import load_balancing_loss, router_z_loss
from moelab.moe.router import RouterOutput

if TYPE_CHECKING:
    from moelab.moe.experts import RoutedExperts


@dataclass
class Dispatched:
    """The experts' input and what `combine` needs to put their output back."""

    x_TD: torch.Tensor  # the tokens the rows come from
    tokens_per_expert_E: torch.Tensor  # rows per expert (long); sums to A
    weight_A: torch.Tensor  # combine weight of each row (carries the router's gradient)
    token_idx_A: torch.Tensor  # the token each row came from, rows grouped by expert in expert order
    num_tokens: int
    dropped: torch.Tensor | None  # [] long: dropped assignments or unpicked tokens (expert choice); None: none
    keep_TK: torch.Tensor | None = None  # token choice with a capacity: which assignments were kept
    # Tokens of the whole batch that ``tokens_per_expert_E`` and ``dropped`` count: every
    # rank's under expert parallelism (telemetry is then the global batch's); None: num_tokens.
    batch_tokens: int | None = None
    _x_AD: torch.Tensor | None = field(default=None, repr=False)

    @property
    def x_AD(self) -> torch.Tensor:
        """One row per kept assignment, grouped by expert (gathered on first use: the local
        fused path never materialises it). Not `functools.cached_property`: its lock
        (Python 3.11) cannot be traced by `torch.compile`."""
        if self._x_AD is None:
            if torch.compiler.is_compiling():
                self._x_AD = self.x_TD[self.token_idx_A]  # traced: inductor fuses it into its own kernel
            else:
                self._x_AD = _Gather.apply(self.x_TD, self.token_idx_A)
        return self._x_AD


class Dispatcher(Protocol):
    def dispatch(self, x_TD: torch.Tensor, route: RouterOutput) -> Dispatched: ...

    def combine(self, y_AD: torch.Tensor, dispatched: Dispatched) -> torch.Tensor: ...

    def run_experts(self, experts: RoutedExperts, dispatched: Dispatched) -> torch.Tensor:
        """The experts on the dispatched rows, combined back to ``y_TD``."""
        ...

    def losses(self, route: RouterOutput, dispatched: Dispatched, seq_len: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(balance loss, z-loss)`` of token-choice routing over the batch this dispatcher
        serves: its own tokens locally; under expert parallelism every rank's, each rank
        returning its share so that the shares sum to the single-process losses."""
        ...


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


def gather_tokens(x_TD: torch.Tensor, idx_A: torch.Tensor) -> torch.Tensor:
    """``x_TD[idx_A]`` (rows of tokens), its backward a scatter-add back to the tokens."""
    return _Gather.apply(x_TD, idx_A)


def sum_rows_per_token(y_AD: torch.Tensor, idx_A: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``y_TD[t] = sum of the rows of token t``, its backward a gather."""
    return _Combine.apply(y_AD, idx_A, num_tokens)


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
            if T == 1 and keep_TK is None:
                # One token (decode): its rows all come from token 0, which costs a few ops
                # fewer per layer than the general flattening (measured per decode step).
                expert_A, weight_A = route.expert_idx_TK.view(-1), route.weights_TK.view(-1)
                token_A = None
            else:
                token_A, expert_A, weight_A = assignments_token_choice(route.expert_idx_TK, route.weights_TK, keep_TK)
            dropped = (~keep_TK).sum() if keep_TK is not None else None
        if T == 1 and keep_TK is None and not route.is_expert_choice and torch.compiler.is_compiling():
            order_A = traced.order_of_distinct(expert_A)
        else:
            # Stable: tokens keep their order inside each expert, so sums are deterministic.
            order_A = torch.argsort(expert_A, stable=True)
        counts_E = count_per_expert(expert_A, E)
        weight_A = weight_A[order_A]
        token_A = expert_A.new_zeros(expert_A.shape) if token_A is None else token_A[order_A]
        return Dispatched(x_TD, counts_E, weight_A, token_A, T, dropped, keep_TK)

    def combine(self, y_AD: torch.Tensor, dispatched: Dispatched) -> torch.Tensor:
        if torch.compiler.is_compiling():
            out_TD = y_AD.new_zeros(dispatched.num_tokens, y_AD.shape[1])
            return out_TD.index_add_(0, dispatched.token_idx_A, y_AD)
        return _Combine.apply(y_AD, dispatched.token_idx_A, dispatched.num_tokens)

    def losses(self, route: RouterOutput, dispatched: Dispatched, seq_len: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        aux = load_balancing_loss(route.probs_TE, route.expert_idx_TK, self.num_experts, seq_len=seq_len)
        return aux, router_z_loss(route.logits_TE)

    def run_experts(self, experts: RoutedExperts, dispatched: Dispatched) -> torch.Tensor:
        """``combine(experts(x_AD))``; where the backend offers it (the segmented one, in
        eager mode), gather -> experts -> scatter-add fused chunk by chunk instead, so the
        ``[A, D]`` rows never go through memory (same numbers, 20-33% faster forward at
        fine-grained shapes, measured in benchmarks/moe_layer.py)."""
        d = dispatched
        backend = experts.backend(d.x_TD)
        if backend.forward_gathered is not None and not torch.compiler.is_compiling():
            return backend.forward_gathered(experts, d.x_TD, d.token_idx_A, d.tokens_per_expert_E, d.weight_A)
        return self.combine(experts(d.x_AD, d.tokens_per_expert_E, d.weight_A), d)
