"""Routing maths as pure functions: scores -> (which experts, with what weight).

Legend (shape suffixes):
  T tokens (batch and sequence flattened), D model dim, E experts, K experts per token,
  C expert capacity, G expert groups, A routed (token, expert) assignments.

All functions take float32 router logits (the router is always computed in float32:
in bf16 the softmax over many experts and the top-k comparison lose ties and small
margins, and ST-MoE reports router instability from low-precision logits).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from moelab.errors import MoelabError


class NonFiniteRouterError(MoelabError, ValueError):
    """Router logits contain NaN or Inf (training has diverged, or the input is bad)."""


NON_FINITE_LOGITS = "router logits contain NaN/Inf: training has diverged or the input is not finite"


def check_router_logits(logits_TE: torch.Tensor, x_TD: torch.Tensor | None = None) -> None:
    """Raise `NonFiniteRouterError` if any logit is NaN/Inf (one host sync); the message
    says whether the router's input ``x_TD`` (when given) was finite."""
    if not bool(torch.isfinite(logits_TE).all()):
        where = "" if x_TD is None else f" (input finite: {bool(torch.isfinite(x_TD).all())})"
        raise NonFiniteRouterError(f"{NON_FINITE_LOGITS}{where}")


def softmax_topk(
    logits_TE: torch.Tensor,
    top_k: int,
    *,
    normalize: bool,
    scaling_factor: float = 1.0,
    n_group: int = 1,
    topk_group: int = 1,
    bias_E: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax over all experts, keep the top-k (Shazeer 2017; Mixtral; Qwen-MoE; OLMoE).

    ``bias_E`` (ERNIE 4.5): added to the probabilities to *choose* the k experts; the
    weights stay the unbiased probabilities (the aux-loss-free balancing idea of
    DeepSeek-V3, on a softmax router).

    Group-limited (DeepSeek-V2 ``group_limited_greedy``, ``n_group > 1``): the E experts
    form G groups, each scored by its largest probability; only the experts of the best
    ``topk_group`` groups compete for the top-k (bounding the devices a token reaches).

    weights = p[top-k] with p = softmax(logits); with ``normalize`` the k weights are
    divided by their sum (Mixtral: equivalent to a softmax over the k kept logits); then
    multiplied by ``scaling_factor`` (DeepSeek-V2's ``routed_scaling_factor``, which
    offsets small un-normalised weights; 1 for the others).
    Returns ``(weights_TK, expert_idx_TK, probs_TE)``.
    """
    probs_TE = torch.softmax(logits_TE, dim=-1)
    if n_group > 1:
        T, E = probs_TE.shape
        probs_TGe = probs_TE.view(T, n_group, E // n_group)
        group_idx = probs_TGe.amax(dim=-1).topk(topk_group, dim=-1).indices
        keep_TG = torch.zeros(T, n_group, dtype=torch.bool, device=probs_TE.device).scatter_(1, group_idx, True)
        # Masked experts get 0 (probabilities are > 0, so they are never chosen over kept ones).
        choice_TE = probs_TGe.masked_fill(~keep_TG.unsqueeze(-1), 0.0).view(T, E)
        weights_TK, expert_idx_TK = torch.topk(choice_TE, top_k, dim=-1)
    elif bias_E is not None:
        expert_idx_TK = torch.topk(probs_TE + bias_E.to(probs_TE.dtype), top_k, dim=-1).indices
        weights_TK = probs_TE.gather(1, expert_idx_TK)
    else:
        weights_TK, expert_idx_TK = torch.topk(probs_TE, top_k, dim=-1)
    if normalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    if scaling_factor != 1.0:
        weights_TK = weights_TK * scaling_factor
    return weights_TK, expert_idx_TK, probs_TE


def sigmoid_topk(
    logits_TE: torch.Tensor,
    top_k: int,
    *,
    bias_E: torch.Tensor | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    normalize: bool = True,
    scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 routing: sigmoid affinities, selection-only bias, group-limited top-k.

    s = sigmoid(logits). Experts are *selected* by s + b (b: the aux-loss-free balancing
    bias), but *weighted* by s alone, so the bias steers load without distorting the
    output (DeepSeek-V3 §2.1.2). Group-limited routing (DeepSeek-V2/V3): experts are
    split into G groups, each group scored by the sum of its top-2 biased affinities,
    and only the best ``topk_group`` groups are eligible. Weights are renormalised over
    the k chosen (``normalize``) and multiplied by ``scaling_factor``.

    Returns ``(weights_TK, expert_idx_TK, probs_TE)`` where ``probs_TE`` are the
    affinities normalised to sum to 1 per token (used by the balance loss, DeepSeek-V3 eq. 19).
    """
    T, E = logits_TE.shape
    scores_TE = torch.sigmoid(logits_TE)
    choice_TE = scores_TE if bias_E is None else scores_TE + bias_E.to(scores_TE.dtype)
    if n_group > 1:
        per_group = E // n_group
        choice_TGe = choice_TE.view(T, n_group, per_group)
        group_score_TG = choice_TGe.topk(min(2, per_group), dim=-1).values.sum(dim=-1)
        group_idx = group_score_TG.topk(topk_group, dim=-1).indices
        group_mask_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, group_idx, True)
        # -inf rather than 0 (as some ports do): with a negative bias a masked 0 could win.
        choice_TE = choice_TGe.masked_fill(~group_mask_TG.unsqueeze(-1), float("-inf")).view(T, E)
    expert_idx_TK = choice_TE.topk(top_k, dim=-1).indices
    weights_TK = scores_TE.gather(1, expert_idx_TK)
    if normalize:
        weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
    weights_TK = weights_TK * scaling_factor
    probs_TE = scores_TE / (scores_TE.sum(dim=-1, keepdim=True) + 1e-20)
    return weights_TK, expert_idx_TK, probs_TE


def switch_top1(logits_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Switch Transformer top-1 (Fedus et al. 2021): weight = softmax prob of the chosen expert.

    Not renormalised: a renormalised single weight would be exactly 1 and the router
    would get no gradient through the output.
    """
    return softmax_topk(logits_TE, 1, normalize=False)


def expert_choice(
    logits_TE: torch.Tensor, capacity: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expert-choice routing (Zhou et al. 2022): each expert takes its top-C tokens.

    S = softmax(logits) over experts per token; expert e picks the C tokens with the
    highest S[:, e] and weights them by S[t, e]. Load is perfectly balanced; a token
    may get 0..E experts. Non-causal: the choice for token t depends on all tokens.
    Returns ``(weights_EC, token_idx_EC, probs_TE)``.
    """
    probs_TE = torch.softmax(logits_TE, dim=-1)
    capacity = min(capacity, probs_TE.shape[0])
    weights_EC, token_idx_EC = torch.topk(probs_TE.t(), capacity, dim=-1)
    return weights_EC, token_idx_EC, probs_TE


def noisy_logits(
    logits_TE: torch.Tensor, noise_logits_TE: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Noisy top-k gating (Shazeer et al. 2017, eq. 4): H = x W_g + N(0, 1) * softplus(x W_noise).

    The learned, input-dependent noise spreads early routing decisions so that more
    experts receive gradient. Training only.
    """
    noise = torch.randn(logits_TE.shape, generator=generator, device=logits_TE.device, dtype=logits_TE.dtype)
    return logits_TE + noise * F.softplus(noise_logits_TE)


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Tokens one expert may take: C = ceil(capacity_factor * T * K / E) (GShard, Switch).

    At factor 1.0 a perfectly balanced router fills every expert exactly; real routers
    are not balanced, so factors 1.0-1.25 are common and < 1 always drops tokens.
    """
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def capacity_keep_mask(
    expert_idx_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    num_experts: int,
    capacity: int,
    policy: str,
) -> torch.Tensor:
    """Which (token, choice) assignments fit in their expert's capacity: ``keep_TK`` (bool).

    Each expert keeps its ``capacity`` highest-priority assignments. Priority:
      - ``"probability"``: higher router weight first (drops the assignments the router
        was least sure of; the Switch/ST-MoE "batch prioritized routing" idea);
      - ``"position"``: all first choices before any second choice, earlier tokens first
        (GShard; the order a sequential dispatcher would fill buffers in).
    """
    T, K = expert_idx_TK.shape
    A = T * K
    device = expert_idx_TK.device
    expert_A = expert_idx_TK.reshape(-1)
    if policy == "position":
        prio_TK = torch.arange(K, device=device).unsqueeze(0) * T + torch.arange(T, device=device).unsqueeze(1)
        prio_A = prio_TK.reshape(-1)
    elif policy == "probability":
        order = torch.argsort(weights_TK.reshape(-1), descending=True, stable=True)
        prio_A = torch.empty_like(order)
        prio_A[order] = torch.arange(A, device=device)
    else:
        raise ValueError(f"unknown drop policy {policy!r}; expected 'probability' or 'position'")
    order = torch.argsort(expert_A * A + prio_A)  # by expert, then by priority
    counts_E = torch.bincount(expert_A, minlength=num_experts)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    rank_sorted = torch.arange(A, device=device) - starts_E[expert_A[order]]
    keep_A = torch.empty(A, dtype=torch.bool, device=device)
    keep_A[order] = rank_sorted < capacity
    return keep_A.view(T, K)
