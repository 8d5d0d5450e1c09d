"""`quantize_model`: the runtime module swap (gpt-fast style) from float to quantised experts
(int8, int4), or the cast of the float experts to bf16 (``"bf16"``: `moelab.moe`'s
``cpu_bf16`` backend runs them)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from moelab.errors import ConfigError
from moelab.moe import MoE, RoutedExperts
from moelab.quant.experts import QuantizedExperts
from moelab.quant.formats import QuantFormat
from moelab.quant.linear import (
    HEAD,
    HEAD_FORMATS,
    QuantizedLinear,
    linear_format,
    quantizable_linears,
)

# "experts": the routed experts only; "all": also every other linear (`moelab.quant.linear`).
WHAT = ("experts", "all")
BF16 = "bf16"  # not a `QuantFormat`: the experts stay `RoutedExperts`, their weights in bf16


@dataclass(frozen=True, kw_only=True)
class QuantReport:
    """What `quantize_model` did. Bytes are of the routed experts' weights only."""

    format: str
    layers: int  # MoE layers whose experts were swapped
    bytes_before: int  # the float experts' parameters
    bytes_after: int  # the quantised buffers (what state_dict saves)
    kernel_bytes: int  # held beside them for a kernel (int4: its packed copy), 0 for int8
    what: str = "experts"
    linears: int = 0  # what="all": the other linears quantised
    linears_float: tuple[str, ...] = ()  # ... and the ones left float (module docstring of quant.linear)
    linear_bytes_before: int = 0
    linear_bytes_after: int = 0
    head: str | None = None  # the LM head's own format, when it is not `format`

    @property
    def ratio(self) -> float:
        """Resident bytes after / before (kernel copies included)."""
        return (self.bytes_after + self.kernel_bytes) / max(1, self.bytes_before)


def quantize_model(model: nn.Module, fmt: QuantFormat | str, *, what: str = "experts",
                   head: QuantFormat | str | None = None) -> QuantReport:
    """Swap every MoE layer's `RoutedExperts` in `model` for `QuantizedExperts` of `fmt`,
    in place (inference only from then on). ``fmt`` may be a format name ("int8", "int4"),
    or "bf16": cast each MoE layer's float experts to bf16 instead (they stay `RoutedExperts`).
    ``what="all"``: also every other linear but the routers (and a tied LM head) becomes a
    `QuantizedLinear` of `fmt` (`moelab.quant.linear`). ``head="int8"`` (with int4 and
    ``what="all"`` only): the LM head in int8 instead, as llama.cpp's Q4 mixes keep it finer."""
    if isinstance(fmt, str) and fmt != BF16:
        fmt = QuantFormat(name=fmt)
    if what not in WHAT:
        raise ConfigError(f"quantize_model: what={what!r} is not supported; allowed: {', '.join(map(repr, WHAT))}")
    head = check_head(head, fmt, what, "quantize_model: head")
    if head is not None and HEAD not in quantizable_linears(model, fmt, head=head)[0]:  # before any swap
        raise ConfigError(f"quantize_model: head={head.name!r}, but the model's LM head is tied to its input "
                          "embedding and stays float (moelab.quant.linear); leave head unset")
    if what == "all" and fmt == BF16:
        raise ConfigError("quantize_model: what='all' with bf16 is the whole model in bf16; cast it instead "
                          "(model.to(torch.bfloat16), or `moelab convert --to-moelab --dtype bf16`)")
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
    report = QuantReport(format=fmt.name, layers=len(layers), bytes_before=before, bytes_after=after,
                         kernel_bytes=kernel)
    return _quantize_linears(model, fmt, report, head) if what == "all" else report


def check_head(head: QuantFormat | str | None, fmt: QuantFormat | str, what: str, field: str) -> QuantFormat | None:
    """The LM head's own format (`moelab.quant.linear.HEAD_FORMATS`), or None; `field` names
    the argument in the error."""
    if head is None:
        return None
    name = head.name if isinstance(head, QuantFormat) else head
    if name not in HEAD_FORMATS:
        raise ConfigError(f"{field}={name!r} is not a head format; allowed: {', '.join(HEAD_FORMATS)}")
    if what != "all" or not isinstance(fmt, QuantFormat) or fmt.name != "int4":
        body = fmt.name if isinstance(fmt, QuantFormat) else fmt
        raise ConfigError(f"{field}={name!r} needs int4 with what='all' (got {body}, what={what!r}): "
                          "it keeps the LM head finer than the other int4 linears")
    return QuantFormat(name=name)


def swap_linears(model: nn.Module, names: list[str], make) -> None:
    """Replace each ``nn.Linear`` named in `names` by ``make(linear)``."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(getattr(parent, child)))


def _quantize_linears(model: nn.Module, fmt: QuantFormat, report: QuantReport,
                      head: QuantFormat | None) -> QuantReport:
    take, skip = quantizable_linears(model, fmt, head=head)
    before = sum(p.numel() * p.element_size() for n in take for p in model.get_submodule(n).parameters())
    for name in take:
        f = linear_format(name, fmt, head)
        swap_linears(model, [name], lambda lin, f=f: QuantizedLinear.from_linear(lin, f))
    after = sum(model.get_submodule(n).nbytes() for n in take)
    return replace(report, what="all", linears=len(take), linears_float=tuple(skip), linear_bytes_before=before,
                   linear_bytes_after=after, head=head.name if head is not None else None)


def _cast_experts_bf16(layers: list[MoE]) -> QuantReport:
    def nbytes(m: nn.Module) -> int:
        return sum(p.numel() * p.element_size() for p in m.parameters())

    before = after = 0
    for moe in layers:
        before += nbytes(moe.experts)
        moe.experts.to(torch.bfloat16)
        after += nbytes(moe.experts)
    return QuantReport(format=BF16, layers=len(layers), bytes_before=before, bytes_after=after, kernel_bytes=0)
