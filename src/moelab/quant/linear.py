"""Quantised dense linears for ``--what all``: attention, dense FFNs, shared experts and the
LM head in int8 or int4, beside the quantised routed experts.

Legend: O output features, I input features, N = I / G groups per row (int4), R rows.

Why: with only the routed experts quantised, a decode step of a ~200M Mixtral-shaped
model still reads the float32 attention and LM head (the LM head alone is V x D: 98 MB at
V = 32000, D = 768), which then bound the step. `QuantizedLinear` is the formats of
`moelab.quant.formats` applied to an ``nn.Linear`` (weight ``[O, I]``, the experts'
per-expert matrices with no E dim), run by the same torch CPU kernels on bf16
activations (`torch._weight_int8pack_mm`, `torch._weight_int4pack_mm_for_cpu`), with the
dequantise-then-matmul fallback where a kernel does not run. The bias, if any, stays
float32 and is added after.

Which linears (`quantizable_linears`, the one rule quantising and loading both follow):
every ``nn.Linear`` of the model except the MoE routers (a `Router` holds its own
weight, so it is never an ``nn.Linear``: routing decisions stay float), and except an LM
head tied to the input embedding (the embedding is a row lookup; quantising the shared
matrix would change the lookup too). int4 also skips linears whose input dim the group
size does not divide: they stay float, and the report counts them. Its kernel packs output
rows in multiples of 16, so a linear with other O (an LM head of a 28093-token vocabulary,
a shared expert's 1-wide gate) gets zero rows appended in the kernel's copy and its output
sliced back: the padding is at most 15 rows, and without it such an LM head stayed float32
and was most of an int4 decode step's bytes (``INT4_ROWS_PADDED_SINCE`` says which
checkpoints follow this rule; version-1 files left those linears float).

int4's kernel copy is the only resident one after packing, as for the experts: the
portable buffers are dropped, and `state_dict` rebuilds them bit for bit through the
kernel (identity input, scale 1, zero 8). ``weight`` gives the dequantised float32 weight
(the reference; what the chunked LM loss reads when a quantised model is evaluated).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moelab.quant import formats
from moelab.quant.experts import (
    KERNEL_DTYPE,
    check_inference,
    int4_rows_mm,
    int4_scales_and_zeros,
    int8_rows_mm,
    int8_rows_traced,
    kernel_pack_int4,
    kernel_runs,
    portable_from_kernel_int4,
    traced_int8_pays,
)
from moelab.quant.formats import QuantFormat

INT4_ROW_MULTIPLE = 16  # torch's int4 CPU packing takes output rows in multiples of 16
# The quant checkpoint version from which int4 linears of any output dim are quantised (the
# kernel's copy padded to `INT4_ROW_MULTIPLE` rows); before it, those stayed float.
INT4_ROWS_PADDED_SINCE = 2
# The LM head may take a finer format than the other linears (llama.cpp's
# ``--output-tensor-type``: its Q4 mixes keep the output matrix at Q6_K). Measured on a
# trained small-moe (BENCHMARKS.md "Quantised experts: quality"): of int4 ``--what all``'s
# +0.0069 nats, +0.0058 is the LM head's. Checkpoints that use it are version 3.
HEAD = "lm_head"
HEAD_FORMATS = ("int8",)
HEAD_FORMAT_SINCE = 3


def int4_fits(out_features: int, in_features: int, group_size: int, *, pad_rows: bool = True) -> bool:
    """Whether int4 takes a linear: the group divides its input dim (and, under the
    version-1 rule, ``pad_rows=False``, its output rows are a multiple of 16)."""
    return in_features % group_size == 0 and (pad_rows or out_features % INT4_ROW_MULTIPLE == 0)


def padded_rows(out_features: int) -> int:
    """Output rows of the int4 kernel's copy: ``out_features`` up to a multiple of 16."""
    return -(-out_features // INT4_ROW_MULTIPLE) * INT4_ROW_MULTIPLE


def quantizable_linears(model: nn.Module, fmt: QuantFormat, *, pad_rows: bool = True,
                        head: QuantFormat | None = None) -> tuple[list[str], list[str]]:
    """(names of the ``nn.Linear`` modules ``--what all`` quantises, names it leaves float).
    ``pad_rows=False``: the rule of version-1 checkpoints (int4 leaves linears whose output
    rows are not a multiple of 16 float). ``head``: the (untied) LM head's own format
    (`linear_format`), which int8 always takes."""
    tied = getattr(getattr(model, "cfg", None), "tie_embeddings", False)
    take, skip = [], []
    for name, m in model.named_modules():
        if type(m) is not nn.Linear:
            continue
        if tied and name == HEAD:
            skip.append(name)
        elif head is not None and name == HEAD:
            take.append(name)
        elif fmt.name == "int4" and not int4_fits(m.out_features, m.in_features, fmt.group_size, pad_rows=pad_rows):
            skip.append(name)
        else:
            take.append(name)
    return take, skip


def linear_format(name: str, fmt: QuantFormat, head: QuantFormat | None) -> QuantFormat:
    """The format of linear `name` under ``--what all`` in `fmt` with LM head format `head`."""
    return head if head is not None and name == HEAD else fmt


def _state_dict_with_portable(module: QuantizedLinear, state_dict: dict, prefix: str, local_metadata) -> None:
    if module._buffers.get("qweight") is None and module._packed is not None:
        for what, t in module.portable_int4().items():
            state_dict[f"{prefix}{what}"] = t


def _restore_portable(module: QuantizedLinear, state_dict: dict, prefix: str, *args) -> None:
    for n, (shape, dtype) in module._portable_shapes.items():
        if module._buffers.get(n) is None and f"{prefix}{n}" in state_dict:
            module._buffers[n] = torch.zeros(shape, dtype=dtype)
            module._packed = None


class QuantizedLinear(nn.Module):
    """``y = x W^T + b`` with W in int8 (per output row) or int4 (groups of G) (module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, fmt: QuantFormat):
        super().__init__()
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        O, I = out_features, in_features  # noqa: E741 - the legend's names
        if fmt.name == "int8":
            self.register_buffer("qweight", torch.zeros(O, I, dtype=torch.int8))
            self.register_buffer("scale", torch.zeros(O, dtype=formats.SCALE_DTYPE))
        else:
            N = I // fmt.group_size
            self.register_buffer("qweight", torch.zeros(O, I // 2, dtype=torch.uint8))
            self.register_buffer("scale", torch.zeros(O, N, dtype=formats.SCALE_DTYPE))
            self.register_buffer("zero", torch.zeros(O, N, dtype=formats.SCALE_DTYPE))
        self.register_buffer("bias", torch.zeros(O) if bias else None)
        self._portable_shapes = {n: (tuple(b.shape), b.dtype) for n, b in self._buffers.items()
                                 if b is not None and n != "bias"}
        self._packed: tuple[torch.Tensor, torch.Tensor] | None = None
        self._register_state_dict_hook(_state_dict_with_portable)
        self._register_load_state_dict_pre_hook(_restore_portable, with_module=True)

    @classmethod
    def from_linear(cls, lin: nn.Linear, fmt: QuantFormat) -> QuantizedLinear:
        q = cls(lin.in_features, lin.out_features, lin.bias is not None, fmt)
        q.to(lin.weight.device)
        with torch.no_grad():
            w = lin.weight.float()
            if fmt.name == "int8":
                qw, scale = formats.quantize_int8(w)
                q.qweight.copy_(qw)
                q.scale.copy_(scale)
            else:
                qw, scale, zero = formats.quantize_int4(w, fmt.group_size)
                q.qweight.copy_(formats.pack_int4(qw))
                q.scale.copy_(scale)
                q.zero.copy_(zero)
            if lin.bias is not None:
                q.bias.copy_(lin.bias.float())
        if fmt.name == "int4" and q.qweight.device.type == "cpu" and kernel_runs("int4"):
            q.kernel_weights()
        return q

    # -- the int4 kernel's copy

    def kernel_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(packed [O16, I/2] uint8 in the kernel's layout, scales_and_zeros [N, O16, 2]
        bf16)``, O16 = `padded_rows` (the rows past O have scale and zero 0: they compute
        0); made once from the portable buffers, which are then dropped (module docstring)."""
        if self._packed is None or self._buffers.get("qweight") is not None:
            pad = padded_rows(self.out_features) - self.out_features
            q_OP = self.qweight
            scale_ON, zero_ON = self.scale, self.zero
            if pad:  # nibble 8 (0x88 a byte), scale and zero 0: rows that compute 0
                q_OP = torch.cat([q_OP, q_OP.new_full((pad, q_OP.shape[1]), 0x88)])
                scale_ON, zero_ON = (torch.cat([t, t.new_zeros(pad, t.shape[1])]) for t in (scale_ON, zero_ON))
            self._packed = (kernel_pack_int4(q_OP), int4_scales_and_zeros(scale_ON, zero_ON))
            for n in ("qweight", "scale", "zero"):
                self._buffers[n] = None
        return self._packed

    def portable_int4(self) -> dict[str, torch.Tensor]:
        packed, sz = self._packed
        full = portable_from_kernel_int4(packed, sz, self.fmt.group_size, self.in_features,
                                         padded_rows(self.out_features))
        return {k: t[: self.out_features].contiguous() for k, t in full.items()}

    def _portable(self, what: str) -> torch.Tensor:
        t = self._buffers.get(what)
        return t if t is not None else self.portable_int4()[what]

    # -- the reference and the accounting

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised float32 weight ``[O, I]`` (exactly what the kernel multiplies by)."""
        if self.fmt.name == "int8":
            return formats.dequantize_int8(self._portable("qweight"), self._portable("scale"))
        return formats.dequantize_int4(formats.unpack_int4(self._portable("qweight")), self._portable("scale"),
                                       self._portable("zero"))

    def nbytes(self) -> int:
        """Bytes `state_dict` saves for the weight (the portable buffers)."""
        return sum(math.prod(s) * d.itemsize for s, d in self._portable_shapes.values())

    def kernel_only_nbytes(self) -> int:
        """Resident bytes that are not buffers (int4: the kernel's packed copy)."""
        return 0 if self._packed is None else sum(t.numel() * t.element_size() for t in self._packed)

    def resident_nbytes(self) -> int:
        held = sum(b.numel() * b.element_size() for n, b in self._buffers.items() if b is not None and n != "bias")
        return held + self.kernel_only_nbytes()

    # -- forward

    def _kernel_runs_here(self, x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and kernel_runs(self.fmt.name)

    @property
    def compilable(self) -> bool:
        return kernel_runs(self.fmt.name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_inference(x, x)
        x_RI = x.reshape(-1, self.in_features)
        if self._kernel_runs_here(x):
            a = x_RI.to(KERNEL_DTYPE)
            if self.fmt.name == "int8" and torch.compiler.is_compiling() and x_RI.shape[0] == 1 and traced_int8_pays():
                y = int8_rows_traced(a, self.qweight.unsqueeze(0), self.scale.unsqueeze(0))
            elif self.fmt.name == "int8":
                y = int8_rows_mm(a, self.qweight, self.scale)
            else:
                packed, sz = self.kernel_weights()
                y = int4_rows_mm(a, packed, self.fmt.group_size, sz)[:, : self.out_features]
        else:
            y = x_RI.float() @ self.weight.to(x.device).t()
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        fmt = self.fmt.name + (f", group_size={self.fmt.group_size}" if self.fmt.name == "int4" else "")
        return f"in_features={self.in_features}, out_features={self.out_features}, format={fmt}"
