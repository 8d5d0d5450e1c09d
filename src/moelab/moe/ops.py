"""The MoE layer's `torch.library` custom ops: what a compiled inference graph must not trace.

Which experts run, and on how many rows, is data dependent. Inside a graph compiled by
`torch.compile` (``generate(compile=True)``), the routing, sort, gather and scatter are
traced (inductor fuses them into a few kernels, with no host sync); the expert GEMMs are
one opaque op that runs the eager segmented kernel on the original weights:

- Inductor cannot trace ``torch._grouped_mm`` in float32 (its meta takes bf16 only,
  torch 2.13), and the traceable alternatives cost memory traffic: gathering
  ``w[expert_idx]`` copies the chosen experts' weights before the product, running all
  E experts reads E/K times the weights.
- The router's finiteness check is a Python bool (a graph break); as an op it runs
  inside the graph, with the same error.
"""

from __future__ import annotations

import torch

from moelab.moe import routing
from moelab.moe.cpu_kernels import segmented_ffn_no_grad


@torch.library.custom_op("moelab::segmented_expert_ffn", mutates_args=())
def segmented_expert_ffn(
    x_AD: torch.Tensor,
    w_in_EHD: torch.Tensor,
    w_out_EDF: torch.Tensor,
    weight_A: torch.Tensor,
    tokens_per_expert_E: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    """`cpu_kernels.segmented_ffn_no_grad` as one op that `torch.compile` does not trace."""
    return segmented_ffn_no_grad(
        x_AD, w_in_EHD, w_out_EDF, weight_A, tokens_per_expert_E.tolist(), activation
    )


@segmented_expert_ffn.register_fake
def _(x_AD, w_in_EHD, w_out_EDF, weight_A, tokens_per_expert_E, activation):
    return x_AD.new_empty(x_AD.shape[0], w_out_EDF.shape[1])


@torch.library.custom_op("moelab::checked_router_logits", mutates_args=())
def checked_router_logits(logits_TE: torch.Tensor) -> torch.Tensor:
    """The logits, after `routing.check_router_logits` (raises on NaN/Inf)."""
    routing.check_router_logits(logits_TE)
    return logits_TE.clone()  # a custom op may not return its input


@checked_router_logits.register_fake
def _(logits_TE):
    return torch.empty_like(logits_TE)
