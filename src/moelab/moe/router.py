"""The router: token representations in, routing decisions out.

Legend: T tokens, D model dim, E experts, K experts per token, C expert capacity.

`Router.forward(x_TD)` is the one place routing is decided. It computes the logits (in
float32 whatever the input dtype; noisy gating and input jitter in training), checks
them, and applies the layer's selection rule (`Router.select`): softmax top-k with or
without renormalisation and scaling, sigmoid with the balancing bias and expert groups,
Switch top-1, or expert choice. Nobody else re-derives routing: the dispatcher, the
losses, telemetry and the lab read the `RouterOutput`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moelab.moe import routing
from moelab.moe.config import MoEConfig


@dataclass(frozen=True)
class RouterOutput:
    """One routing decision over T tokens.

    Token choice (softmax, sigmoid, switch): ``expert_idx_TK`` / ``weights_TK``, each
    token's K experts and combine weights. Expert choice: ``token_idx_EC`` /
    ``weights_EC``, each expert's C tokens. ``probs_TE`` is the per-token distribution
    over experts that the balance loss and the entropy read (for sigmoid routing: the
    affinities normalised per token); ``logits_TE`` (float32) feed the z-loss.
    """

    logits_TE: torch.Tensor
    probs_TE: torch.Tensor
    expert_idx_TK: torch.Tensor | None = None
    weights_TK: torch.Tensor | None = None
    token_idx_EC: torch.Tensor | None = None
    weights_EC: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.logits_TE.shape[0]

    @property
    def is_expert_choice(self) -> bool:
        return self.token_idx_EC is not None


class Router(nn.Module):
    """Learned router: ``weight [E, D]`` (plus ``noise_weight`` for noisy gating and the
    ``expert_bias`` buffer for the sigmoid router), and the layer's selection rule."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.d_model))
        if cfg.router_bias:  # gpt-oss: a learned bias on the logits
            self.bias = nn.Parameter(torch.zeros(cfg.num_experts))
        if cfg.noisy_gating:
            self.noise_weight = nn.Parameter(torch.zeros(cfg.num_experts, cfg.d_model))
        if cfg.router == "sigmoid" or cfg.selection_bias:
            # Selection-only bias (aux-loss-free balancing). A buffer: updated by
            # `update_expert_bias`, never by the optimizer; saved with the model.
            self.register_buffer("expert_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.normal_(self.weight, std=std)
        if self.cfg.router_bias:
            nn.init.zeros_(self.bias)

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        """Logits (with jitter and noise in training), the finiteness check, selection."""
        cfg = self.cfg
        if self.training and cfg.jitter_eps > 0:
            # Switch Transformer: multiplicative jitter on the router input only.
            jitter = torch.empty_like(x_TD).uniform_(1.0 - cfg.jitter_eps, 1.0 + cfg.jitter_eps)
            logits_TE = self.logits(x_TD * jitter)
        else:
            logits_TE = self.logits(x_TD)
        if cfg.check_finite:
            if torch.compiler.is_compiling() and not torch.is_grad_enabled():
                # Inside a compiled inference graph a Python bool would break the graph: the
                # check is an assert that inductor compiles into its kernels (no host sync,
                # no op call: an opaque op cost ~14 us a layer). It raises RuntimeError with
                # the error's message, which the compiled decode step
                # (`moelab.infer.compiled`) turns back into `NonFiniteRouterError`.
                torch._assert_async(torch.isfinite(logits_TE).all(), routing.NON_FINITE_LOGITS)
            else:
                routing.check_router_logits(logits_TE, x_TD)
        return self.select(logits_TE)

    def logits(self, x_TD: torch.Tensor, *, router_dtype: str | None = None) -> torch.Tensor:
        """``x W^T`` in float32 at least (float64 stays float64, for reference tests and
        gradcheck); ``router_dtype="bfloat16"`` (default: the config's) rounds through a
        bf16 product first."""
        dtype = torch.promote_types(x_TD.dtype, torch.float32)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            if (router_dtype or self.cfg.router_dtype) == "bfloat16":
                bf16 = torch.bfloat16
                logits_TE = F.linear(x_TD.to(bf16), self.weight.to(bf16)).to(dtype)
            else:
                logits_TE = F.linear(x_TD.to(dtype), self.weight.to(dtype))
            if self.cfg.router_bias:
                logits_TE = logits_TE + self.bias.to(logits_TE.dtype)
            if self.cfg.noisy_gating and self.training:
                noise_TE = F.linear(x_TD.to(dtype), self.noise_weight.to(dtype))
                logits_TE = routing.noisy_logits(logits_TE, noise_TE)
        return logits_TE

    def select(self, logits_TE: torch.Tensor) -> RouterOutput:
        """The layer's selection rule applied to given logits (pure: no noise, no check).

        Also what the lab uses to ask "which experts would a bf16 router pick?".
        """
        cfg = self.cfg
        if cfg.router == "expert_choice":
            T = logits_TE.shape[0]
            capacity = routing.expert_capacity(T, cfg.num_experts, cfg.top_k, cfg.capacity_factor or 1.0)
            weights_EC, token_idx_EC, probs_TE = routing.expert_choice(logits_TE, capacity)
            return RouterOutput(logits_TE, probs_TE, token_idx_EC=token_idx_EC, weights_EC=weights_EC)
        if cfg.router == "softmax":
            weights_TK, expert_idx_TK, probs_TE = routing.softmax_topk(
                logits_TE, cfg.top_k, normalize=cfg.norm_topk_prob, scaling_factor=cfg.routed_scaling_factor,
                n_group=cfg.n_group, topk_group=cfg.topk_group, bias_E=self.expert_bias if cfg.selection_bias else None,
            )
        elif cfg.router == "switch":
            weights_TK, expert_idx_TK, probs_TE = routing.switch_top1(logits_TE)
        else:
            weights_TK, expert_idx_TK, probs_TE = routing.sigmoid_topk(
                logits_TE,
                cfg.top_k,
                bias_E=self.expert_bias,
                n_group=cfg.n_group,
                topk_group=cfg.topk_group,
                normalize=cfg.norm_topk_prob,
                scaling_factor=cfg.routed_scaling_factor,
            )
        return RouterOutput(logits_TE, probs_TE, expert_idx_TK=expert_idx_TK, weights_TK=weights_TK)

    def extra_repr(self) -> str:
        return f"router={self.cfg.router!r}, num_experts={self.cfg.num_experts}, top_k={self.cfg.top_k}"
