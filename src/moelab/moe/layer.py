"""The MoE layer: route -> dispatch -> experts -> combine (+ shared experts), then losses
and telemetry.

Legend: T tokens, D model dim, E experts, K experts per token, C capacity, A assignments.

Three siblings, each behind a small protocol (see their modules): the `Router` decides
(`RouterOutput`), the dispatcher (`LocalDispatcher`, or an expert-parallel one set from
outside) moves rows to the experts and back, and `RoutedExperts` runs them with the
backend the device and dtype call for. `MoE.forward(x)` returns an `MoEOutput` holding
the output, the unweighted aux and z losses, `RoutingStats` telemetry and (on request)
the per-token routing decisions. Nothing is stored in globals or on the module between
calls: the caller (the model, the trainer) gathers results per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moelab.moe.config import MoEConfig, active_ffn_hidden
from moelab.moe.dispatch import Dispatched, Dispatcher, LocalDispatcher
from moelab.moe.experts import FeedForward, RoutedExperts
from moelab.moe.losses import router_z_loss, update_expert_bias
from moelab.moe.router import Router, RouterOutput
from moelab.moe.routing import NonFiniteRouterError


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

    @classmethod
    def of(cls, route: RouterOutput, routed: Dispatched) -> RoutingDecision:
        if not route.is_expert_choice:
            kept = routed.keep_TK if routed.keep_TK is not None else torch.ones_like(route.expert_idx_TK, dtype=torch.bool)
            return cls(route.expert_idx_TK.detach(), (route.weights_TK * kept).detach(), kept)
        token_idx_EC, T = route.token_idx_EC, route.num_tokens
        E = token_idx_EC.shape[0]
        idx_TE = torch.full((T, E), -1, dtype=torch.long, device=token_idx_EC.device)
        w_TE = torch.zeros(T, E, dtype=route.weights_EC.dtype, device=token_idx_EC.device)
        experts_EC = torch.arange(E, device=token_idx_EC.device).unsqueeze(1).expand_as(token_idx_EC)
        idx_TE[token_idx_EC, experts_EC] = experts_EC
        w_TE[token_idx_EC, experts_EC] = route.weights_EC.detach()
        return cls(idx_TE, w_TE, idx_TE >= 0)


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


class MoE(nn.Module):
    """Sparse Mixture-of-Experts FFN layer. See `MoEConfig` for every option.

    ``dispatcher`` is plain state, not a module: expert parallelism replaces it from
    outside (`moe.dispatcher = ...`) without touching the layer's parameters.
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.router = Router(cfg)
        self.dispatcher: Dispatcher = LocalDispatcher(cfg.num_experts, cfg.top_k, cfg.capacity_factor, cfg.drop_policy)
        self.experts = RoutedExperts(cfg.d_model, cfg.d_expert, cfg.num_experts, cfg.activation, impl=cfg.impl,
                                     bias=cfg.expert_proj_bias, swiglu_alpha=cfg.swiglu_alpha,
                                     swiglu_limit=cfg.swiglu_limit, weight_on_input=cfg.weight_on_input)
        if cfg.num_shared_experts:
            self.shared_experts = FeedForward(cfg.d_model, cfg.shared_hidden, cfg.activation)
            if cfg.shared_expert_gate:
                self.shared_expert_gate = nn.Linear(cfg.d_model, 1, bias=False)

    def forward(self, x: torch.Tensor, *, return_routing: bool = False, telemetry: bool = True) -> MoEOutput:
        """Route, dispatch, run the experts, combine, add the shared experts.

        ``telemetry=False`` (inference: generation) skips what only training and analysis
        read -- the balance and z losses (returned as 0) and `RoutingStats` (None) -- which
        at decode is a dozen small ops per layer for one token. The output is unchanged.
        """
        cfg = self.cfg
        if x.shape[-1] != cfg.d_model:
            raise ValueError(f"MoE input has last dim {x.shape[-1]}, expected d_model={cfg.d_model}")
        x_TD = x.reshape(-1, cfg.d_model)
        route = self.router(x_TD)
        routed = self.dispatcher.dispatch(x_TD, route)
        y_TD = self.dispatcher.run_experts(self.experts, routed)  # experts, then combine
        if cfg.num_shared_experts:
            shared_TD = self.shared_experts(x_TD)
            if cfg.shared_expert_gate:
                shared_TD = torch.sigmoid(self.shared_expert_gate(x_TD)) * shared_TD
            y_TD = y_TD + shared_TD
        zero = route.logits_TE.new_zeros(())
        out = MoEOutput(
            output=y_TD.view(x.shape),
            aux_loss=zero,
            z_loss=zero,
            stats=None,
            routing=RoutingDecision.of(route, routed) if return_routing else None,
            aux_loss_coef=cfg.aux_loss_coef,
            z_loss_coef=cfg.z_loss_coef,
        )
        if telemetry:
            self._losses_and_stats(out, x, route, routed)
        return out

    def _losses_and_stats(self, out: MoEOutput, x: torch.Tensor, route: RouterOutput, routed: Dispatched) -> None:
        cfg = self.cfg
        if route.is_expert_choice:  # balanced by construction: aux stays 0
            out.z_loss = router_z_loss(route.logits_TE)
        else:  # the dispatcher knows the batch (one process's, or every rank's under EP)
            seq_len = x.shape[-2] if (cfg.seq_aux_loss and x.dim() >= 3) else None
            out.aux_loss, out.z_loss = self.dispatcher.losses(route, routed, seq_len)
        with torch.no_grad():
            probs_TE, logits_TE = route.probs_TE, route.logits_TE
            out.stats = RoutingStats(
                tokens_per_expert=routed.tokens_per_expert_E,
                num_tokens=route.num_tokens if routed.batch_tokens is None else routed.batch_tokens,
                top_k=cfg.top_k,
                dropped=torch.zeros((), dtype=torch.long) if routed.dropped is None else routed.dropped.to(torch.long),
                router_entropy=(-(probs_TE * torch.log(probs_TE.clamp_min(1e-20))).sum(-1).mean()
                                if route.num_tokens else probs_TE.new_zeros(())),
                max_router_logit=logits_TE.abs().max() if route.num_tokens else logits_TE.new_zeros(()),
            )

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
    "RouterOutput",
    "active_ffn_hidden",
]
