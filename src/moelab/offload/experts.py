"""`OffloadedExperts`: routed experts whose weights live in an `ExpertStore`.

Legend: A rows (kept assignments, grouped by expert), T tokens, D model dim, F expert
hidden dim, E experts, H = 2F (swiglu) or F (gelu), R rows of one expert.

A sibling of `moelab.moe.RoutedExperts` that an MoE layer holds as ``moe.experts`` (the
swap `moelab.offload.load_offloaded` makes, as `moelab.quant` swaps in
`QuantizedExperts`). It computes the same ``y_A = (act(x_A W_in[e]^T) * w_A)
W_out[e]^T``, asking the store for each expert that has rows, one at a time, and
offers ``backend(x)`` and ``forward(x_AD, tokens_per_expert_E, weight_A)`` like the
float experts do, so the local dispatcher drives it unchanged:

* `FUSED` (the default): ``forward_gathered`` too, so the dispatcher hands it the tokens
  ``x_TD`` and each expert gathers its rows and scatter-adds its output (one token at
  decode: no gather at all). Also serves the unfused call.
* `LOOP` (``MoEConfig.impl="loop"``): the readable reference over ``x_AD`` rows, no
  ``forward_gathered``, so the dispatcher gathers and combines itself.

Experts are fetched one at a time and used at once: a pool of one slot per layer is
enough for any routing. With ``next_router`` set (`load_offloaded(prefetch=True)`), each
forward first asks the store to prefetch the experts the next MoE layer's router picks
for this layer's input, then holds its own pool while it reads it (`ExpertStore.using`). Inference only (the store's weights have no gradient); a call
that would need one is refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moelab.errors import ConfigError
from moelab.moe.cpu_kernels import act_forward, per_expert_rows
from moelab.moe.experts import ExpertsBackend
from moelab.offload.store import ExpertStore
from moelab.quant import formats, vnni
from moelab.quant.experts import (
    KERNEL_DTYPE,
    fused_int4_fits,
    fused_max_rows,
    int4_fused_expert,
    int4_rows_mm,
    int8_rows_mm,
    kernel_runs,
    portable_from_kernel_int4,
    run_rows,
)


def _check_inference(x: torch.Tensor, weight_A: torch.Tensor) -> None:
    if torch.is_grad_enabled() and (x.requires_grad or weight_A.requires_grad):
        raise ConfigError("offloaded experts are inference-only; run the model under torch.no_grad() or "
                          "torch.inference_mode() (generate does), or load it resident (moelab.rundir.load_model)")


def _loop_forward(experts: OffloadedExperts, x_AD: torch.Tensor, counts_E: torch.Tensor,
                  weight_A: torch.Tensor) -> torch.Tensor:
    """Readable reference: each expert's slice of rows through `OffloadedExperts.expert_ffn`."""
    _check_inference(x_AD, weight_A)
    experts.prefetch_next(x_AD)
    y_AD = x_AD.new_zeros(x_AD.shape[0], experts.d_model)
    start = 0
    with experts.store.using(experts.layer):
        for e, n in enumerate(counts_E.tolist()):
            if n:
                rows = slice(start, start + n)
                y_AD[rows] = experts.expert_ffn(x_AD[rows], e) * weight_A[rows].to(x_AD.dtype).unsqueeze(-1)
                start += n
    return y_AD


def _fused(experts: OffloadedExperts, x: torch.Tensor, counts_E: torch.Tensor, weight_A: torch.Tensor,
           token_idx_A: torch.Tensor | None = None) -> torch.Tensor:
    """``x_AD -> y_AD``, or with ``token_idx_A`` (gather and combine fused) ``x_TD -> y_TD``;
    the combine weight folded into the activation (a pass over ``[R, F]``, not ``[R, D]``)."""
    _check_inference(x, weight_A)
    if experts.quant is not None:
        return _quantized(experts, x, counts_E, weight_A, token_idx_A)
    w_A1 = weight_A.to(x.dtype).unsqueeze(-1)

    def expert(e: int, x_RD: torch.Tensor, rows: slice) -> torch.Tensor:
        w_in_HD, w_out_DF = experts.weights(e)
        return F.linear(act_forward(F.linear(x_RD, w_in_HD), experts.activation).mul_(w_A1[rows]), w_out_DF)

    experts.prefetch_next(x)
    with experts.store.using(experts.layer):
        return per_expert_rows(x, counts_E, weight_A.shape[0], experts.d_model, expert, token_idx_A)


def quantized_mm(experts: OffloadedExperts, parts: tuple[torch.Tensor, ...], proj: str,
                 x_RI: torch.Tensor) -> torch.Tensor:
    """One projection ("in"/"out") of a quantised expert whose slot tensors are `parts`
    (`ExpertLayout.slot_parts`): torch's CPU kernel, as `QuantizedExperts` calls it, or
    the dequantised weight where that kernel does not run."""
    fmt = experts.quant
    if fmt == "int8":
        q, scale = parts[:2] if proj == "in" else parts[2:]
        if kernel_runs("int8"):
            return int8_rows_mm(x_RI, q, scale)
        return x_RI @ formats.dequantize_int8(q, scale).to(x_RI.dtype).t()
    if experts.kernel_form:
        packed, sz = parts[:2] if proj == "in" else parts[2:]
        return int4_rows_mm(x_RI, packed, experts.group_size, sz)
    q, scale, zero = parts[:3] if proj == "in" else parts[3:]
    return x_RI @ formats.dequantize_int4(formats.unpack_int4(q), scale, zero).to(x_RI.dtype).t()


def _quantized(experts: OffloadedExperts, x: torch.Tensor, counts_E: torch.Tensor, weight_A: torch.Tensor,
               token_idx_A: torch.Tensor | None = None) -> torch.Tensor:
    """The resident `QuantizedExperts`' computation (`moelab.quant.experts.run_rows`: bf16
    kernel inputs, float32 activation between), each expert's parts fetched once."""
    fetched: list[tuple[torch.Tensor, ...]] = []

    def mm(proj: str, e: int, x_RI: torch.Tensor) -> torch.Tensor:
        if proj == "in":  # the expert's first GEMM: fetch it (the second uses the same slot)
            fetched[:] = [experts.weights(e)]
        return quantized_mm(experts, fetched[0], proj, x_RI)

    kernel = kernel_runs("int8") if experts.quant == "int8" else experts.kernel_form
    act_dtype = KERNEL_DTYPE if kernel else torch.promote_types(x.dtype, torch.float32)
    experts.prefetch_next(x)
    if experts.quant == "int4" and kernel and _fused_as_resident(experts, counts_E):
        return _int4_fused_per_expert(experts, x, counts_E, weight_A, token_idx_A)
    with experts.store.using(experts.layer):
        return run_rows(x, counts_E, weight_A, mm, act_dtype, experts.activation, token_idx_A)


def _fused_as_resident(experts: OffloadedExperts, counts_E: torch.Tensor) -> bool:
    """Whether the resident layer would run in one C call (`moelab.quant.experts.run_int4_fused`)."""
    return (vnni.enabled() and vnni.fused_enabled()
            and fused_int4_fits(experts.d_model, experts.d_expert, experts.group_size, experts.activation)
            and int(counts_E.max()) <= fused_max_rows())


def _int4_fused_per_expert(experts: OffloadedExperts, x: torch.Tensor, counts_E: torch.Tensor,
                           weight_A: torch.Tensor, token_idx_A: torch.Tensor | None) -> torch.Tensor:
    """The resident one-call layer's numbers, expert by expert from the slots
    (`int4_fused_expert`: its C code on one expert), summed in the order it sums."""

    def expert(e: int, x_RD: torch.Tensor, rows: slice) -> torch.Tensor:
        p_in, sz_in, p_out, sz_out = experts.weights(e)
        return int4_fused_expert(x_RD, weight_A[rows], p_in, sz_in, p_out, sz_out, experts.group_size).to(x.dtype)

    with experts.store.using(experts.layer):
        return per_expert_rows(x.to(KERNEL_DTYPE), counts_E, weight_A.shape[0], experts.d_model, expert,
                               token_idx_A, out_dtype=x.dtype)


LOOP = ExpertsBackend(
    "offload_loop", _loop_forward, lambda experts, x: True,
    "offloaded experts, the readable reference: per expert with rows, fetch it and run its slice",
)
FUSED = ExpertsBackend(
    "offload", lambda experts, x_AD, counts_E, weight_A: _fused(experts, x_AD, counts_E, weight_A),
    lambda experts, x: True,
    "offloaded experts: per expert with rows, fetch it, gather its rows, scatter-add its output",
    forward_gathered=lambda experts, x_TD, token_idx_A, counts_E, weight_A: _fused(
        experts, x_TD, counts_E, weight_A, token_idx_A),
)


class OffloadedExperts(nn.Module):
    """E routed experts of MoE layer `layer` of `store` (no parameters, no buffers: its
    state dict is empty, so the model's holds only the non-expert weights)."""

    def __init__(self, store: ExpertStore, layer: int, impl: str = "grouped"):
        super().__init__()
        lay = store.layouts[layer]
        self.store, self.layer = store, layer
        self.num_experts, self.d_model, self.d_expert = lay.num_experts, lay.d_model, lay.d_expert
        self.activation, self.impl = lay.activation, impl
        # a quantised run's format (else None); int4: whether the slots hold the kernel's layout
        self.quant, self.group_size, self.kernel_form = lay.quant, lay.group_size, lay.kernel_form
        # (router of the next MoE layer, its store index), set by `load_offloaded(prefetch=
        # True)`; a tuple, so that the router is not registered as this module's child.
        self.next_router: tuple[nn.Module, int] | None = None

    def prefetch_next(self, x_ND: torch.Tensor) -> None:
        """Ask the store to load the experts the next MoE layer's router would pick for
        these rows (this layer's input stands in for that layer's), most picked first."""
        if self.next_router is None:
            return
        router, layer = self.next_router
        with torch.no_grad():
            route = router.select(router.logits(x_ND))
        if route.expert_idx_TK is None:  # expert choice: no per-token guess to make
            return
        counts_E = torch.bincount(route.expert_idx_TK.reshape(-1), minlength=router.cfg.num_experts)
        order = torch.argsort(counts_E, descending=True, stable=True)
        self.store.prefetch(layer, order[counts_E[order] > 0].tolist())

    def weights(self, e: int) -> tuple[torch.Tensor, ...]:
        """``(W_in [H, D], W_out [D, F])`` of expert e, from the store (valid until the
        store's next `get` for this layer); a quantised run's: its slot tensors
        (`ExpertLayout.slot_parts`)."""
        return self.store.get(self.layer, e)

    def expert_ffn(self, x_ND: torch.Tensor, e: int) -> torch.Tensor:
        """Expert e applied to N rows: down(act(x W_in^T)), as `RoutedExperts.expert_ffn`
        (quantised: on the dequantised weights, in float32, the readable reference)."""
        if self.quant is not None:
            parts = self.weights(e)
            w_in, w_out = (self.dequantized_weight(parts, proj) for proj in ("in", "out"))
            h = F.linear(x_ND.float(), w_in)
            return F.linear(act_forward(h, self.activation, inplace=False), w_out).to(x_ND.dtype)
        w_in, w_out = self.weights(e)
        return F.linear(act_forward(F.linear(x_ND, w_in), self.activation, inplace=False), w_out)

    def dequantized_weight(self, parts: tuple[torch.Tensor, ...], proj: str) -> torch.Tensor:
        """The float32 weight of a quantised expert's projection from its slot tensors."""
        if self.quant == "int8" or not self.kernel_form:
            n = 2 if self.quant == "int8" else 3
            t = parts[:n] if proj == "in" else parts[n:]
            if self.quant == "int8":
                return formats.dequantize_int8(*t)
            return formats.dequantize_int4(formats.unpack_int4(t[0]), t[1], t[2])
        # The kernel's packed layout is the CPU build's: the portable form is read back
        # through the kernel itself (exactly), then dequantised in float32.
        packed, sz = parts[:2] if proj == "in" else parts[2:]
        d_out, d_in = (packed.shape[0], self.d_model) if proj == "in" else (self.d_model, self.d_expert)
        p = portable_from_kernel_int4(packed, sz, self.group_size, d_in, d_out)
        return formats.dequantize_int4(formats.unpack_int4(p["qweight"]), p["scale"], p["zero"])

    def backend(self, x: torch.Tensor) -> ExpertsBackend:
        if x.device.type != self.store.device.type:
            raise ConfigError(f"offloaded experts run on their store's device ({self.store.device}); the input is "
                              f"on {x.device}")
        return LOOP if self.impl == "loop" else FUSED

    def forward(self, x_AD: torch.Tensor, tokens_per_expert_E: torch.Tensor, weight_A: torch.Tensor) -> torch.Tensor:
        """``y_A = w_A * expert_e(x_A)`` for rows grouped by expert, as `RoutedExperts` does."""
        return self.backend(x_AD).forward(self, x_AD, tokens_per_expert_E, weight_A)

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        raise ConfigError("offloaded experts have no parameters to initialise; they are read from the checkpoint")

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, d_model={self.d_model}, d_expert={self.d_expert}, "
                f"activation={self.activation}, layer={self.layer}, store={self.store.policy_name}")
