"""Weight bytes per moelab checkpoint format, and what fits in a given memory.

The formats are the ones `moelab quantize` writes and moelab runs (docs/quant.md):
the routed experts in ``fp32``, ``bf16``, ``int8`` or ``int4``, everything else at the
"rest" dtype (`moelab size --dtype`), as `moelab quantize --format` leaves it. The
bytes are the file's and the process's: the quantised experts keep one resident copy
whose size equals the saved one (int4's kernel layout has the same nibbles and the same
bf16 scale/zero pairs), so the calculator and the runtime tell the same story
(tests/test_size_formats.py checks both against real quantised models).

Per routed expert projection of O output rows and I inputs (swiglu: ``gate_up`` with
O = 2F, I = D, and ``down`` with O = D, I = F; gelu: ``up`` O = F, I = D):

    int8   O I x 1 byte   + O x 2 (one bf16 scale per output row)
    int4   O I / 2 bytes  + (O I / G) x 4 (a bf16 scale and a bf16 zero per group of G)

Expert biases (gpt-oss) stay at the rest dtype. An `ExplicitSpec` (the textbook
"8 x 7B" expert as one number) has no projection shapes: its int8 scales are left out
and say so in the notes.

**What fits** (`memory_plan`): a format fits a memory of M bytes when weights + KV cache
<= `USABLE_FRACTION` x M, the same rule as min GPUs. When it does not, a float format can
still run with offloaded experts (`--expert-memory`, `moelab.offload`; float, int8 and
int4 runs): the budget left for experts is usable M - non-expert weights - KV cache, and
the smallest budget the runtime accepts is one expert per MoE layer (`ExpertStore`'s rule
for its default per-layer scope; the store counts the weight matrices, so biases are left
out, and lays a quantised expert's parts out on 64-byte boundaries, `SLOT_ALIGN`).
"""

from __future__ import annotations

from dataclasses import dataclass

from moelab.accounting.memory import USABLE_FRACTION, bytes_per_param
from moelab.accounting.params import ParamCount
from moelab.accounting.spec import ArchSpec, MLPSpec, MoESpec, Spec
from moelab.errors import ConfigError

MOELAB_FORMATS = ("fp32", "bf16", "int8", "int4")
FLOAT_FORMATS = ("fp32", "bf16")
SLOT_ALIGN = 64  # moelab.offload.store's alignment of each part of a quantised expert in a slot
INT4_GROUP_SIZES = (32, 64, 128)  # moelab.quant.formats.INT4_GROUP_SIZES (torch-free copy)
SCALE_BYTES = 2  # bf16 scales and zero points


def _projections(expert: MLPSpec, d_model: int) -> list[tuple[int, int]]:
    """(rows O, cols I) of each weight matrix of one routed expert, as moelab stores it."""
    F, D = expert.d_ff, d_model
    return [(2 * F if expert.gated else F, D), (D, F)]


def _bias_params(expert: MLPSpec, d_model: int) -> int:
    n_in = 2 if expert.gated else 1
    return n_in * expert.d_ff + d_model if expert.bias else 0


def _matrix_bytes(rows: int, cols: int, fmt: str, group_size: int) -> float:
    if fmt == "int8":
        return rows * cols + rows * SCALE_BYTES
    if fmt == "int4":
        if cols % group_size:
            raise ConfigError(f"int4 group size {group_size} does not divide an expert input dim of {cols}")
        return rows * cols / 2 + (rows * cols // group_size) * 2 * SCALE_BYTES
    return rows * cols * bytes_per_param(fmt)


def _check(fmt: str, group_size: int) -> None:
    if fmt not in MOELAB_FORMATS:
        raise ConfigError(f"format {fmt!r} is not a moelab format; expected one of {', '.join(MOELAB_FORMATS)}")
    if fmt == "int4" and group_size not in INT4_GROUP_SIZES:
        raise ConfigError(f"int4 group size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}, "
                          f"got {group_size!r}")


def routed_expert_bytes(spec: Spec, counts: ParamCount, fmt: str, *, rest: str = "bf16",
                        group_size: int = 128) -> float:
    """Bytes of every routed expert of `spec` in format `fmt` (module docstring)."""
    _check(fmt, group_size)
    if fmt in FLOAT_FORMATS:
        return counts.routed_experts * bytes_per_param(fmt)
    if not isinstance(spec, ArchSpec):
        per_param = 1.0 if fmt == "int8" else 0.5 + 2 * SCALE_BYTES / group_size
        return counts.routed_experts * per_param
    total = 0.0
    for layer in spec.layers:
        moe = layer.ffn
        if not isinstance(moe, MoESpec):
            continue
        one = sum(_matrix_bytes(rows, cols, fmt, group_size) for rows, cols in _projections(moe.expert, spec.d_model))
        one += _bias_params(moe.expert, spec.d_model) * bytes_per_param(rest)
        total += moe.num_experts * one
    return total


def format_bytes(spec: Spec, counts: ParamCount, fmt: str, *, rest: str = "bf16", group_size: int = 128) -> float:
    """All weights of a checkpoint whose routed experts are in format `fmt` and the rest at
    `rest` (as `moelab quantize --format fmt` writes from a `rest` checkpoint)."""
    other = counts.total - counts.routed_experts
    return other * bytes_per_param(rest) + routed_expert_bytes(spec, counts, fmt, rest=rest, group_size=group_size)


def _slot_bytes(rows: int, cols: int, fmt: str, group_size: int) -> int:
    """One matrix of a quantised expert in an offload slot: its codes and its scales
    (int4: with the zeros, the kernel's (scale, zero) pairs), each part aligned."""
    def aligned(n: int) -> int:
        return -(-n // SLOT_ALIGN) * SLOT_ALIGN

    if fmt == "int8":
        return aligned(rows * cols) + aligned(rows * SCALE_BYTES)
    return aligned(rows * cols // 2) + aligned(rows * (cols // group_size) * 2 * SCALE_BYTES)


def smallest_expert_budget(spec: Spec, fmt: str, group_size: int = 128) -> float | None:
    """The smallest ``--expert-memory`` the offloaded runtime accepts: one expert (its
    weight matrices, in `fmt`) per MoE layer. None when offloading does not apply (no MoE
    layer, no projection shapes, or an int4 group that does not divide them)."""
    if not isinstance(spec, ArchSpec):
        return None
    experts = [layer.ffn.expert for layer in spec.layers if isinstance(layer.ffn, MoESpec)]
    if not experts:
        return None
    if fmt in FLOAT_FORMATS:
        one = max(sum(rows * cols for rows, cols in _projections(e, spec.d_model)) for e in experts)
        return len(experts) * one * bytes_per_param(fmt)
    if fmt == "int4" and any(cols % group_size for e in experts for _, cols in _projections(e, spec.d_model)):
        return None
    one = max(sum(_slot_bytes(rows, cols, fmt, group_size) for rows, cols in _projections(e, spec.d_model))
              for e in experts)
    return float(len(experts) * one)


@dataclass(frozen=True, kw_only=True)
class FormatFit:
    """One format on a memory of `memory_bytes` (module docstring)."""

    format: str
    weight_bytes: float
    expert_bytes: float
    kv_cache_bytes: float
    fits: bool  # every weight resident, plus the KV cache
    expert_budget: float | None  # offloaded: bytes left for experts (None: resident or not offloadable)
    smallest_budget: float | None  # the runtime's minimum --expert-memory
    resident_fraction: float | None  # expert_budget / expert_bytes, capped at 1

    @property
    def smallest_memory(self) -> float:
        """The smallest memory on which this format runs: offloaded with the smallest
        expert budget, else all resident."""
        need = self.weight_bytes + self.kv_cache_bytes
        if self.smallest_budget is not None:
            need = min(need, need - self.expert_bytes + self.smallest_budget)
        return need / USABLE_FRACTION

    @property
    def runs(self) -> bool:
        return self.fits or (self.expert_budget is not None and self.smallest_budget is not None
                             and self.expert_budget >= self.smallest_budget)

    def to_dict(self) -> dict:
        return {"format": self.format, "weight_bytes": self.weight_bytes, "expert_bytes": self.expert_bytes,
                "kv_cache_bytes": self.kv_cache_bytes, "fits": self.fits, "runs": self.runs,
                "expert_budget": self.expert_budget, "smallest_expert_budget": self.smallest_budget,
                "resident_fraction": self.resident_fraction,
                "smallest_memory": self.smallest_memory}


def memory_plan(spec: Spec, counts: ParamCount, memory_bytes: float, *, kv_bytes: float, rest: str = "bf16",
                group_size: int = 128) -> list[FormatFit]:
    """Each moelab format on `memory_bytes`: resident, offloaded, or not at all."""
    if memory_bytes <= 0:
        raise ConfigError(f"memory must be > 0 bytes, got {memory_bytes}")
    usable = USABLE_FRACTION * memory_bytes
    out = []
    for fmt in MOELAB_FORMATS:
        try:
            weights = format_bytes(spec, counts, fmt, rest=rest, group_size=group_size)
            experts = routed_expert_bytes(spec, counts, fmt, rest=rest, group_size=group_size)
        except ConfigError:
            continue  # e.g. an int4 group that does not divide this model's dims
        fits = weights + kv_bytes <= usable
        smallest = smallest_expert_budget(spec, fmt, group_size)
        budget = fraction = None
        if not fits and smallest is not None:
            budget = max(0.0, usable - (weights - experts) - kv_bytes)
            fraction = min(1.0, budget / experts) if experts else None
        out.append(FormatFit(format=fmt, weight_bytes=weights, expert_bytes=experts, kv_cache_bytes=kv_bytes,
                             fits=fits, expert_budget=budget, smallest_budget=smallest,
                             resident_fraction=fraction))
    return out

