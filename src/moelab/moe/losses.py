"""Auxiliary losses and the aux-loss-free bias update, as pure functions.

Legend: T tokens, E experts, K experts per token, B sequences, S tokens per sequence.
"""

from __future__ import annotations

import torch


def load_balancing_loss(
    probs_TE: torch.Tensor,
    expert_idx_TK: torch.Tensor,
    num_experts: int,
    *,
    seq_len: int | None = None,
) -> torch.Tensor:
    """Switch/Mixtral load-balancing loss ``E * sum_e f_e * P_e``.

    f_e = share of the T*K routed assignments that went to expert e (counted from the
    hard top-k choice, no gradient), P_e = mean router probability of e. Minimised
    (value 1.0) when both are uniform: the gradient flows through P and pushes
    probability away from over-loaded experts (Fedus et al. 2021, eq. 4).

    Normalisation: we divide counts by T*K so the balanced value is 1 for every K.
    HF transformers divides by T only, so its value is K times ours.

    Computed per layer by the caller: summing f and P over layers before the product
    (as the HF helper does when it concatenates all layers' logits) lets one layer's
    imbalance cancel another's.

    ``seq_len``: compute the loss per sequence of that length and average (DeepSeek-V3's
    sequence-wise balance loss, which stops a single sequence from using few experts
    even when the batch as a whole is balanced).
    """
    T, E = probs_TE.shape
    K = expert_idx_TK.shape[-1]
    if T == 0:  # no tokens, no imbalance (a mean over nothing would be NaN); graph kept
        return probs_TE.sum() * 0.0
    if seq_len is None:
        seq_len = T
    if T % seq_len:
        raise ValueError(f"load_balancing_loss: {T} tokens are not a whole number of sequences of {seq_len}")
    B = T // seq_len
    with torch.no_grad():
        if B == 1:  # one op instead of three for the common batch-wide loss
            counts_BE = torch.bincount(expert_idx_TK.reshape(-1), minlength=E).to(probs_TE.dtype).unsqueeze(0)
        else:
            counts_BE = torch.zeros(B, E, device=probs_TE.device, dtype=probs_TE.dtype)
            counts_BE.scatter_add_(
                1,
                expert_idx_TK.reshape(B, seq_len * K),
                torch.ones(B, seq_len * K, device=probs_TE.device, dtype=probs_TE.dtype),
            )
        f_BE = counts_BE / (seq_len * K)
    P_BE = probs_TE.reshape(B, seq_len, E).mean(dim=1)
    return num_experts * (f_BE * P_BE).sum(dim=-1).mean()


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss (Zoph et al. 2022, eq. 5): mean_t (logsumexp_e logits[t, e])^2.

    Penalises large router logits, which overflow in low precision and make the
    softmax saturate; ST-MoE found it removes training instabilities at no quality cost.
    """
    if logits_TE.shape[0] == 0:  # no tokens: 0, not the NaN of an empty mean
        return logits_TE.float().sum() * 0.0
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


def update_expert_bias(bias_E: torch.Tensor, tokens_per_expert_E: torch.Tensor, rate: float) -> torch.Tensor:
    """Aux-loss-free balancing step (DeepSeek-V3 §2.1.2; Wang et al. 2024).

    b_e <- b_e + rate * sign(mean_load - load_e): under-loaded experts become more
    likely to be selected, over-loaded ones less. The bias only affects selection,
    never the combine weights, so it balances load without a gradient-interfering loss.
    Returns the new bias (the input is not modified).
    """
    load_E = tokens_per_expert_E.to(bias_E.dtype)
    return bias_E + rate * torch.sign(load_E.mean() - load_E)
