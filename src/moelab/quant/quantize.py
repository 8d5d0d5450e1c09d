"""`quantize_model`: the runtime module swap (gpt-fast style) from float to quantised experts."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from moelab.errors import ConfigError
from moelab.moe import MoE, RoutedExperts
from moelab.quant.experts import QuantizedExperts
from moelab.quant.formats import QuantFormat

WHAT = ("experts",)  # "all" (attention, dense FFNs, LM head) comes later


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
    in place (inference only from then on). ``fmt`` may be a format name ("int8", "int4")."""
    if isinstance(fmt, str):
        fmt = QuantFormat(name=fmt)
    if what not in WHAT:
        extra = " ('all' is not implemented yet)" if what == "all" else ""
        raise ConfigError(f"quantize_model: what={what!r} is not supported{extra}; allowed: {', '.join(map(repr, WHAT))}")
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    for moe in layers:
        if not isinstance(moe.experts, RoutedExperts):
            raise ConfigError(f"quantize_model: the experts are already {type(moe.experts).__name__}; "
                              "quantise the float model")
    before = after = kernel = 0
    for moe in layers:
        experts = moe.experts
        before += sum(p.numel() * p.element_size() for p in experts.parameters())
        moe.experts = QuantizedExperts.from_experts(experts, fmt)
        after += moe.experts.nbytes()
        kernel += moe.experts.kernel_nbytes()
    return QuantReport(format=fmt.name, layers=len(layers), bytes_before=before, bytes_after=after,
                       kernel_bytes=kernel)
