"""`quantize_model`: the runtime module swap (gpt-fast style) from float to quantised experts
(int8, int4), or the cast of the float experts to bf16 (``"bf16"``: `moelab.moe`'s
``cpu_bf16`` backend runs them)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moelab.errors import ConfigError
from moelab.moe import MoE, RoutedExperts
from moelab.quant.experts import QuantizedExperts
from moelab.quant.formats import QuantFormat

WHAT = ("experts",)  # "all" (attention, dense FFNs, LM head) comes later
BF16 = "bf16"  # not a `QuantFormat`: the experts stay `RoutedExperts`, their weights in bf16


@dataclass(frozen=True, kw_only=True)
class QuantReport:
    """What `quantize_model` did. Bytes are of the routed experts' weights only."""

    format: str
    layers: int  # MoE layers whose experts were swapped
    bytes_before: int  # the float experts' parameters
    bytes_after: int  # the quantised buffers (what state_dict saves)
    kernel_bytes: int  # held beside them for a kernel (int4: its packed copy), 0 for int8

    @property
    def ratio(self) -> float:
        """Resident bytes after / before (kernel copies included)."""
        return (self.bytes_after + self.kernel_bytes) / max(1, self.bytes_before)


def quantize_model(model: nn.Module, fmt: QuantFormat | str, *, what: str = "experts") -> QuantReport:
    """Swap every MoE layer's `RoutedExperts` in `model` for `QuantizedExperts` of `fmt`,
    in place (inference only from then on). ``fmt`` may be a format name ("int8", "int4"),
    or "bf16": cast each MoE layer's float experts to bf16 instead (they stay `RoutedExperts`)."""
    if isinstance(fmt, str) and fmt != BF16:
        fmt = QuantFormat(name=fmt)
    if what not in WHAT:
        extra = " ('all' is not implemented yet)" if what == "all" else ""
        raise ConfigError(f"quantize_model: what={what!r} is not supported{extra}; allowed: {', '.join(map(repr, WHAT))}")
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    for moe in layers:
        if not isinstance(moe.experts, RoutedExperts):
            raise ConfigError(f"quantize_model: the experts are already {type(moe.experts).__name__}; "
                              "quantise the float model")
        if moe.experts.reference_only and fmt != BF16:
            # The quantised kernels compute act(x W_in^T) W_out^T only.
            raise ConfigError("quantize_model: experts with biases, the clamped gpt-oss GLU or input weighting "
                              "(MoEConfig.expert_proj_bias / activation='swiglu_oai' / weight_on_input) have no "
                              "quantised kernel; use bf16")
    if fmt == BF16:
        return _cast_experts_bf16(layers)
    before = after = kernel = 0
    for moe in layers:
        experts = moe.experts
        before += sum(p.numel() * p.element_size() for p in experts.parameters())
        moe.experts = QuantizedExperts.from_experts(experts, fmt)
        after += moe.experts.nbytes()
        kernel += moe.experts.kernel_nbytes()
    return QuantReport(format=fmt.name, layers=len(layers), bytes_before=before, bytes_after=after,
                       kernel_bytes=kernel)


def _cast_experts_bf16(layers: list[MoE]) -> QuantReport:
    def nbytes(m: nn.Module) -> int:
        return sum(p.numel() * p.element_size() for p in m.parameters())

    before = after = 0
    for moe in layers:
        before += nbytes(moe.experts)
        moe.experts.to(torch.bfloat16)
        after += nbytes(moe.experts)
    return QuantReport(format=BF16, layers=len(layers), bytes_before=before, bytes_after=after, kernel_bytes=0)
