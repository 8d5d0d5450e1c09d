"""The MoE layer's `torch.library` custom ops: what a compiled inference graph must not trace.

Which experts run, and on how many rows, is data dependent. Inside a graph compiled by
`torch.compile` (``generate(compile=True)``), the routing, sort, gather and scatter are
traced (inductor fuses them into a few kernels, with no host sync); the expert GEMMs are
one opaque op that runs the eager segmented kernel on the original weights:

- Inductor cannot trace ``torch._grouped_mm`` in float32 (its meta takes bf16 only,
  torch 2.13), and the traceable alternatives cost memory traffic: gathering
  ``w[expert_idx]`` copies the chosen experts' weights before the product, running all
  E experts reads E/K times the weights.

Training under `torch.compile` (``moelab train --compile``) has the same problem with
gradients: traced, the eager kernel's ``counts.tolist()`` makes dynamo specialise the
graph on every expert's row count (``counts[7] == 227``), so each step recompiles until
``recompile_limit`` (measured: 20 tiny-moe steps in 117 s against 3 s eager). The
training op `segmented_expert_ffn_train` is opaque too, with its backward registered
(`cpu_kernels.segmented_ffn_backward`, the eager kernel's own): one graph for any routing.
"""

from __future__ import annotations

import torch

from moelab.moe.cpu_kernels import (
    _forward_chunks,
    chunks_of,
    segmented_ffn_backward,
    segmented_ffn_no_grad,
)


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


@torch.library.custom_op("moelab::segmented_expert_ffn_fwd", mutates_args=())
def _segmented_expert_ffn_fwd(
    x_AD: torch.Tensor,
    w_in_EHD: torch.Tensor,
    w_out_EDF: torch.Tensor,
    weight_A: torch.Tensor,
    tokens_per_expert_E: torch.Tensor,
    activation: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The training forward: ``(y_AD, h_AH)``, ``h`` kept for the backward."""
    counts = tokens_per_expert_E.tolist()
    h_AH = x_AD.new_empty(x_AD.shape[0], w_in_EHD.shape[1])
    chunks = chunks_of(counts, w_in_EHD.shape[1] * x_AD.element_size())
    return _forward_chunks(x_AD, w_in_EHD, w_out_EDF, weight_A, chunks, activation, h_AH, None), h_AH


@_segmented_expert_ffn_fwd.register_fake
def _(x_AD, w_in_EHD, w_out_EDF, weight_A, tokens_per_expert_E, activation):
    return x_AD.new_empty(x_AD.shape[0], w_out_EDF.shape[1]), x_AD.new_empty(x_AD.shape[0], w_in_EHD.shape[1])


@torch.library.custom_op("moelab::segmented_expert_ffn_bwd", mutates_args=())
def _segmented_expert_ffn_bwd(
    grad_AD: torch.Tensor,
    x_AD: torch.Tensor,
    w_in_EHD: torch.Tensor,
    w_out_EDF: torch.Tensor,
    weight_A: torch.Tensor,
    h_AH: torch.Tensor,
    tokens_per_expert_E: torch.Tensor,
    activation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    counts = tokens_per_expert_E.tolist()
    chunks = chunks_of(counts, w_in_EHD.shape[1] * x_AD.element_size())
    grads = segmented_ffn_backward(grad_AD, x_AD, w_in_EHD, w_out_EDF, weight_A, h_AH, None, chunks, counts,
                                   activation, (True, True, True, True))
    return tuple(grads)  # type: ignore[return-value]


@_segmented_expert_ffn_bwd.register_fake
def _(grad_AD, x_AD, w_in_EHD, w_out_EDF, weight_A, h_AH, tokens_per_expert_E, activation):
    return torch.empty_like(x_AD), torch.empty_like(w_in_EHD), torch.empty_like(w_out_EDF), torch.empty_like(weight_A)


def _setup_context(ctx, inputs, output):
    x_AD, w_in_EHD, w_out_EDF, weight_A, tokens_per_expert_E, activation = inputs
    ctx.save_for_backward(x_AD, w_in_EHD, w_out_EDF, weight_A, output[1], tokens_per_expert_E)
    ctx.activation = activation


def _backward(ctx, grad_y, grad_h):
    x_AD, w_in_EHD, w_out_EDF, weight_A, h_AH, counts_E = ctx.saved_tensors
    dx, dw_in, dw_out, dweight = _segmented_expert_ffn_bwd(grad_y, x_AD, w_in_EHD, w_out_EDF, weight_A, h_AH,
                                                           counts_E, ctx.activation)
    return dx, dw_in, dw_out, dweight, None, None


_segmented_expert_ffn_fwd.register_autograd(_backward, setup_context=_setup_context)


def segmented_expert_ffn_train(
    x_AD: torch.Tensor,
    w_in_EHD: torch.Tensor,
    w_out_EDF: torch.Tensor,
    weight_A: torch.Tensor,
    tokens_per_expert_E: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    """`cpu_kernels.segmented_ffn` with autograd, as ops a compiled training graph does
    not trace (module docstring): ``y_AD``."""
    return _segmented_expert_ffn_fwd(x_AD, w_in_EHD, w_out_EDF, weight_A, tokens_per_expert_E, activation)[0]
