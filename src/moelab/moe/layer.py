"""The MoE layer: router -> dispatch -> experts -> combine, plus losses and telemetry.

Legend: T tokens, D model dim, E experts, K experts per token, C capacity, A assignments.

`MoE.forward(x)` returns an `MoEOutput` holding the output, the unweighted aux and z
losses, `RoutingStats` telemetry and (on request) the per-token routing decisions.
Nothing is stored in globals or on the module between calls: the caller (the model,
the trainer) gathers results per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moelab.errors import MoelabError
from moelab.moe import dispatch, routing
from moelab.moe.config import MoEConfig, active_ffn_hidden
from moelab.moe.experts import FeedForward, RoutedExperts, grouped_ffn_no_grad, one_token_ffn
from moelab.moe.losses import load_balancing_loss, router_z_loss, update_expert_bias


class NonFiniteRouterError(MoelabError, ValueError):
    """Router logits contain NaN or Inf (training has diverged, or the input is bad)."""


@dataclass(frozen=True)
class RoutingStats:
    """Telemetry of one MoE call. Tensors are detached; `to_dict` gives plain floats.

    ``tokens_per_expert`` counts kept assignments per expert (so it sums to T*K minus
    ``dropped`` for token choice, or E*C for expert choice). ``dropped`` counts dropped
    (token, expert) assignments; for expert choice, the tokens that no expert picked.
    ``max_router_logit`` is the largest |logit|, the quantity the z-loss controls.
    """

    tokens_per_expert: torch.Tensor  # [E] long
    num_tokens: int
    top_k: int
    dropped: torch.Tensor  # [] long
    router_entropy: torch.Tensor  # [] mean entropy (nats) of the router distribution
    max_router_logit: torch.Tensor  # [] max |logit|

    @property
    def busiest_expert_share(self) -> torch.Tensor:
        """Fraction of routed assignments on the busiest expert (1/E when balanced)."""
        load = self.tokens_per_expert.float()
        return load.max() / load.sum().clamp_min(1)

    @property
    def load_cv(self) -> torch.Tensor:
        """Coefficient of variation (std / mean, population std) of expert load; 0 = balanced."""
        load = self.tokens_per_expert.float()
        return load.std(unbiased=False) / load.mean().clamp_min(1e-9)

    @property
    def dead_experts(self) -> torch.Tensor:
        """Experts that received no token in this call."""
        return (self.tokens_per_expert == 0).sum()

    @property
    def dropped_fraction(self) -> torch.Tensor:
        return self.dropped.float() / max(1, self.num_tokens * self.top_k)

    def to_dict(self) -> dict:
        return {
            "tokens_per_expert": self.tokens_per_expert.tolist(),
            "num_tokens": self.num_tokens,
            "dropped": int(self.dropped),
            "dropped_fraction": float(self.dropped_fraction),
            "busiest_expert_share": float(self.busiest_expert_share),
            "load_cv": float(self.load_cv),
            "dead_experts": int(self.dead_experts),
            "router_entropy": float(self.router_entropy),
            "max_router_logit": float(self.max_router_logit),
        }


@dataclass(frozen=True)
class RoutingDecision:
    """Per-token routing, for analysis. Token choice: ``[T, K]``; dropped slots have
    ``kept=False`` and weight 0. Expert choice: ``expert_idx`` is ``[T, E]`` with -1 where
    the expert did not pick the token."""

    expert_idx: torch.Tensor
    weights: torch.Tensor
    kept: torch.Tensor


@dataclass
class MoEOutput:
    output: torch.Tensor  # same shape as the input
    aux_loss: torch.Tensor  # unweighted load-balancing loss (1.0 when balanced); 0 without telemetry
    z_loss: torch.Tensor  # unweighted router z-loss; 0 without telemetry
    stats: RoutingStats | None  # None when called with ``telemetry=False``
    routing: RoutingDecision | None = None
    aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0

    @property
    def loss(self) -> torch.Tensor:
        """The weighted auxiliary term to add to the task loss."""
        return self.aux_loss_coef * self.aux_loss + self.z_loss_coef * self.z_loss


def _check_router_logits(logits_TE: torch.Tensor, x_TD: torch.Tensor) -> None:
    if not bool(torch.isfinite(logits_TE).all()):
        raise NonFiniteRouterError(
            "router logits contain NaN/Inf: training has diverged or the input is not finite "
            f"(input finite: {bool(torch.isfinite(x_TD).all())})"
        )


@torch.library.custom_op("moelab::grouped_expert_ffn", mutates_args=())
def grouped_expert_ffn(
    x_AD: torch.Tensor,
    w_in_EHD: torch.Tensor,
    w_out_EDF: torch.Tensor,
    weight_A: torch.Tensor,
    offsets_E: torch.Tensor,
    logits_TE: torch.Tensor | None,
    activation: str,
) -> torch.Tensor:
    """`grouped_ffn_no_grad` as one op that `torch.compile` does not trace (no autograd).

    Inductor cannot trace ``torch._grouped_mm`` in float32 (its meta takes bf16 only,
    torch 2.13), and the traceable alternatives cost memory traffic: gathering
    ``w[expert_idx]`` copies the chosen experts' weights before the product, running all
    E experts reads E/K times the weights. Opaque, the op runs the eager grouped GEMMs on
    the original weights. ``logits_TE`` (when given) are checked to be finite here, the
    check `MoE.forward` makes in eager mode.
    """
    if logits_TE is not None:
        _check_router_logits(logits_TE, x_AD)
    return grouped_ffn_no_grad(x_AD, w_in_EHD, w_out_EDF, weight_A, offsets_E, activation)


@grouped_expert_ffn.register_fake
def _(x_AD, w_in_EHD, w_out_EDF, weight_A, offsets_E, logits_TE, activation):
    return x_AD.new_empty(x_AD.shape[0], w_out_EDF.shape[1])


@torch.library.custom_op("moelab::one_token_expert_ffn", mutates_args=())
def one_token_expert_ffn(
    x_1D: torch.Tensor,
    w_in_EHD: torch.Tensor,
    w_out_EDF: torch.Tensor,
    expert_K: torch.Tensor,
    weight_K: torch.Tensor,
    logits_TE: torch.Tensor | None,
    activation: str,
) -> torch.Tensor:
    """`one_token_ffn` as an opaque op: at one token, a GEMV pair per chosen expert beats
    ``torch._grouped_mm`` (15.2 vs 16.6 ms per decode step of the 213M benchmark model,
    2 threads, measured side by side)."""
    if logits_TE is not None:
        _check_router_logits(logits_TE, x_1D)
    return one_token_ffn(x_1D, w_in_EHD, w_out_EDF, expert_K.tolist(), weight_K, activation)


@one_token_expert_ffn.register_fake
def _(x_1D, w_in_EHD, w_out_EDF, expert_K, weight_K, logits_TE, activation):
    return torch.empty_like(x_1D)


def _compiled_inference(cfg: MoEConfig) -> bool:
    """Traced by `torch.compile` at inference (`generate(compile=True)`): the experts go
    through `experts_in_graph`, whose op also makes the finiteness check, so the graph
    has no host sync and no break."""
    return torch.compiler.is_compiling() and not torch.is_grad_enabled() and cfg.impl == "grouped"


def experts_in_graph(
    experts: RoutedExperts, x_TD: torch.Tensor, assignments: dispatch.Assignments, logits_TE: torch.Tensor | None
) -> torch.Tensor:
    """The routed experts inside a compiled inference graph (`generate(compile=True)`).

    Sorting by expert, the row gather and the weighted scatter-add are traced (inductor
    fuses them into a few kernels, with no host sync); only the grouped GEMMs are the
    opaque `grouped_expert_ffn`. One token takes `one_token_expert_ffn` instead (the
    eager `forward_one_token`). Equal to `RoutedExperts.forward` (tested).
    """
    token_A, expert_A, weight_A = assignments
    if x_TD.shape[0] == 1:  # decode at batch 1: all assignments are token 0's
        return one_token_expert_ffn(
            x_TD, experts.w_in, experts.down_proj, expert_A, weight_A, logits_TE, experts.activation
        )
    E = experts.num_experts
    order_A = torch.argsort(expert_A, stable=True)
    # Counts by comparison, not bincount: bincount's output size depends on the data.
    counts_E = (expert_A.unsqueeze(1) == torch.arange(E, device=expert_A.device)).sum(0)
    offsets_E = counts_E.cumsum(0).to(torch.int32)
    tok_A = token_A[order_A]
    y_AD = grouped_expert_ffn(
        x_TD[tok_A], experts.w_in, experts.down_proj, weight_A[order_A], offsets_E, logits_TE, experts.activation
    )
    return torch.zeros_like(x_TD).index_add_(0, tok_A, y_AD)


class Router(nn.Module):
    """Learned router: ``weight [E, D]``, logits computed in float32 whatever the input
    dtype (``router_dtype="bfloat16"``: rounded through a bf16 product, then float32)."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.d_model))
        if cfg.noisy_gating:
            self.noise_weight = nn.Parameter(torch.zeros(cfg.num_experts, cfg.d_model))
        if cfg.router == "sigmoid":
            # Selection-only bias (aux-loss-free balancing). A buffer: updated by
            # `update_expert_bias`, never by the optimizer; saved with the model.
            self.register_buffer("expert_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.normal_(self.weight, std=std)

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        # float32 at least (float64 stays float64, for reference tests and gradcheck).
        dtype = torch.promote_types(x_TD.dtype, torch.float32)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            if self.cfg.router_dtype == "bfloat16":
                bf16 = torch.bfloat16
                logits_TE = F.linear(x_TD.to(bf16), self.weight.to(bf16)).to(dtype)
            else:
                logits_TE = F.linear(x_TD.to(dtype), self.weight.to(dtype))
            if self.cfg.noisy_gating and self.training:
                noise_TE = F.linear(x_TD.to(dtype), self.noise_weight.to(dtype))
                logits_TE = routing.noisy_logits(logits_TE, noise_TE)
        return logits_TE


class MoE(nn.Module):
    """Sparse Mixture-of-Experts FFN layer. See `MoEConfig` for every option."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.router = Router(cfg)
        self.experts = RoutedExperts(cfg.d_model, cfg.d_expert, cfg.num_experts, cfg.activation)
        if cfg.num_shared_experts:
            self.shared_experts = FeedForward(cfg.d_model, cfg.shared_hidden, cfg.activation)
            if cfg.shared_expert_gate:
                self.shared_expert_gate = nn.Linear(cfg.d_model, 1, bias=False)

    def forward(self, x: torch.Tensor, *, return_routing: bool = False, telemetry: bool = True) -> MoEOutput:
        """Route, run the experts, combine.

        ``telemetry=False`` (inference: generation) skips what only training and analysis
        read -- the balance and z losses (returned as 0) and `RoutingStats` (None) -- which
        at decode is a dozen small ops per layer for one token. The output is unchanged.
        """
        cfg = self.cfg
        if x.shape[-1] != cfg.d_model:
            raise ValueError(f"MoE input has last dim {x.shape[-1]}, expected d_model={cfg.d_model}")
        x_TD = x.reshape(-1, cfg.d_model)
        T = x_TD.shape[0]
        if self.training and cfg.jitter_eps > 0:
            # Switch Transformer: multiplicative jitter on the router input only.
            jitter = torch.empty_like(x_TD).uniform_(1.0 - cfg.jitter_eps, 1.0 + cfg.jitter_eps)
            logits_TE = self.router.logits(x_TD * jitter)
        else:
            logits_TE = self.router.logits(x_TD)
        compiled_inference = _compiled_inference(cfg)
        if cfg.check_finite and not compiled_inference:
            _check_router_logits(logits_TE, x_TD)

        if cfg.router == "expert_choice":
            capacity = routing.expert_capacity(T, cfg.num_experts, cfg.top_k, cfg.capacity_factor or 1.0)
            weights_EC, token_idx_EC, probs_TE = routing.expert_choice(logits_TE, capacity)
            assignments = dispatch.assignments_expert_choice(token_idx_EC, weights_EC)
            aux_loss = logits_TE.new_zeros(())  # balanced by construction
            picked_T = torch.zeros(T, dtype=torch.long, device=x.device).index_add_(
                0, token_idx_EC.reshape(-1), torch.ones_like(token_idx_EC.reshape(-1))
            )
            dropped = (picked_T == 0).sum()
            decision = self._expert_choice_decision(token_idx_EC, weights_EC, T) if return_routing else None
        else:
            weights_TK, expert_idx_TK, probs_TE = self._token_choice(logits_TE)
            keep_TK = None
            if cfg.capacity_factor is not None:
                capacity = routing.expert_capacity(T, cfg.num_experts, cfg.top_k, cfg.capacity_factor)
                keep_TK = routing.capacity_keep_mask(
                    expert_idx_TK, weights_TK, cfg.num_experts, capacity, cfg.drop_policy
                )
            assignments = dispatch.assignments_token_choice(expert_idx_TK, weights_TK, keep_TK)
            seq_len = x.shape[-2] if (cfg.seq_aux_loss and x.dim() >= 3) else None
            aux_loss = (load_balancing_loss(probs_TE, expert_idx_TK, cfg.num_experts, seq_len=seq_len)
                        if telemetry else None)  # not computed for generation
            dropped = (~keep_TK).sum() if keep_TK is not None else torch.zeros((), dtype=torch.long)
            decision = None
            if return_routing:
                kept = keep_TK if keep_TK is not None else torch.ones_like(expert_idx_TK, dtype=torch.bool)
                decision = RoutingDecision(expert_idx_TK.detach(), (weights_TK * kept).detach(), kept)

        tokens_per_expert = None
        if cfg.impl == "loop":
            y_TD = self.experts.forward_reference(x_TD, assignments)
        elif compiled_inference:
            y_TD = experts_in_graph(self.experts, x_TD, assignments, logits_TE if cfg.check_finite else None)
        elif T == 1 and not torch.is_grad_enabled():
            # Single-token decode: kept assignments all belong to token 0.
            _, expert_A, weight_A = assignments
            y_TD = self.experts.forward_one_token(x_TD, expert_A.tolist(), weight_A)
        else:
            plan = dispatch.sort_by_expert(assignments, cfg.num_experts, T)
            y_TD = self.experts(x_TD, plan)
            tokens_per_expert = plan.counts_E  # kept assignments per expert, already counted

        if cfg.num_shared_experts:
            shared_TD = self.shared_experts(x_TD)
            if cfg.shared_expert_gate:
                shared_TD = torch.sigmoid(self.shared_expert_gate(x_TD)) * shared_TD
            y_TD = y_TD + shared_TD

        if not telemetry:
            zero = logits_TE.new_zeros(())
            return MoEOutput(output=y_TD.view(x.shape), aux_loss=zero, z_loss=zero, stats=None, routing=decision,
                             aux_loss_coef=cfg.aux_loss_coef, z_loss_coef=cfg.z_loss_coef)
        z_loss = router_z_loss(logits_TE)
        with torch.no_grad():
            if tokens_per_expert is None:
                tokens_per_expert = torch.bincount(assignments[1], minlength=cfg.num_experts)
            entropy = -(probs_TE * torch.log(probs_TE.clamp_min(1e-20))).sum(-1).mean()
            stats = RoutingStats(
                tokens_per_expert=tokens_per_expert,
                num_tokens=T,
                top_k=cfg.top_k,
                dropped=dropped.to(torch.long),
                router_entropy=entropy,
                max_router_logit=logits_TE.abs().max() if T else logits_TE.new_zeros(()),
            )
        return MoEOutput(
            output=y_TD.view(x.shape),
            aux_loss=aux_loss,
            z_loss=z_loss,
            stats=stats,
            routing=decision,
            aux_loss_coef=cfg.aux_loss_coef,
            z_loss_coef=cfg.z_loss_coef,
        )

    def _token_choice(self, logits_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        if cfg.router == "softmax":
            return routing.softmax_topk(logits_TE, cfg.top_k, normalize=cfg.norm_topk_prob,
                                        scaling_factor=cfg.routed_scaling_factor)
        if cfg.router == "switch":
            return routing.switch_top1(logits_TE)
        return routing.sigmoid_topk(
            logits_TE,
            cfg.top_k,
            bias_E=self.router.expert_bias,
            n_group=cfg.n_group,
            topk_group=cfg.topk_group,
            normalize=cfg.norm_topk_prob,
            scaling_factor=cfg.routed_scaling_factor,
        )

    @staticmethod
    def _expert_choice_decision(token_idx_EC: torch.Tensor, weights_EC: torch.Tensor, T: int) -> RoutingDecision:
        E = token_idx_EC.shape[0]
        idx_TE = torch.full((T, E), -1, dtype=torch.long, device=token_idx_EC.device)
        w_TE = torch.zeros(T, E, dtype=weights_EC.dtype, device=weights_EC.device)
        experts_EC = torch.arange(E, device=token_idx_EC.device).unsqueeze(1).expand_as(token_idx_EC)
        idx_TE[token_idx_EC, experts_EC] = experts_EC
        w_TE[token_idx_EC, experts_EC] = weights_EC.detach()
        return RoutingDecision(idx_TE, w_TE, idx_TE >= 0)

    @torch.no_grad()
    def update_bias(self, tokens_per_expert_E: torch.Tensor) -> None:
        """Aux-loss-free balancing step with rate ``cfg.bias_update_rate`` (sigmoid router).

        Call after the optimizer step with the load observed in that step.
        """
        if self.cfg.router != "sigmoid" or self.cfg.bias_update_rate == 0:
            return
        bias = self.router.expert_bias
        bias.copy_(update_expert_bias(bias, tokens_per_expert_E.to(bias.device), self.cfg.bias_update_rate))

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        self.router.reset_parameters(std)
        self.experts.reset_parameters(std, out_std)
        if self.cfg.num_shared_experts:
            self.shared_experts.reset_parameters(std, out_std)
            if self.cfg.shared_expert_gate:
                nn.init.normal_(self.shared_expert_gate.weight, std=std)


__all__ = [
    "MoE",
    "MoEConfig",
    "MoEOutput",
    "NonFiniteRouterError",
    "RoutingDecision",
    "RoutingStats",
    "Router",
    "active_ffn_hidden",
]
