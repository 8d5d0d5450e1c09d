"""Dispatch: turn routing decisions into a plan that groups assignments by expert.

Legend: T tokens, K experts per token, E experts, C capacity, A kept assignments.

Every router ends in the same flat form: A assignments ``(token, expert, weight)``.
Token-choice routers give A = T*K minus dropped; expert choice gives A = E*C. The plan
sorts assignments by expert so each expert's tokens are one contiguous slice, which is
what a grouped GEMM (or a loop over slices) wants.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DispatchPlan:
    token_idx_A: torch.Tensor  # token of each assignment, sorted by expert
    weight_A: torch.Tensor  # its combine weight (carries the router's gradient)
    counts_E: torch.Tensor  # assignments per expert (long)
    num_tokens: int

    @property
    def offsets_E(self) -> torch.Tensor:
        """End offset of each expert's slice, int32 (the layout `grouped_mm` expects)."""
        return torch.cumsum(self.counts_E, 0, dtype=torch.int32)


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


def sort_by_expert(assignments: Assignments, num_experts: int, num_tokens: int) -> DispatchPlan:
    """Group assignments by expert: each expert's tokens become one contiguous slice."""
    token_A, expert_A, weight_A = assignments
    # Stable sort keeps token order inside each expert, so index_add sums deterministically.
    order = torch.argsort(expert_A, stable=True)
    counts_E = torch.bincount(expert_A, minlength=num_experts)
    return DispatchPlan(token_A[order], weight_A[order], counts_E, num_tokens)
