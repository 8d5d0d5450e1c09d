"""What a compiled one-row decode step traces instead of calling out of its graph.

Legend: R rows, O / I a matrix's output / input dim, A assignment rows (grouped by expert),
E experts, H = 2F (swiglu) or F rows of the experts' input projection, D model dim.

At one token a decode step reads every weight once and multiplies it by one vector: it is
bound by how fast the weights stream. On the CPUs we measured, inductor's own vectorised
reduction over a weight matrix streams it faster than the BLAS GEMV that ``F.linear``
calls at one row (one thread, the [32000, 768] LM head: fp32 3.5 against 5.9 ms, bf16 1.6
against 4.8; BENCHMARKS.md "Decode per weight format"), and it takes the dequantisation of
int8 weights and the gather of each row's expert into the same loop. So inside
``generate(compile=True)``:

- `OneRowLinears` (a `TorchFunctionMode` active while the step is traced) turns every
  one-row float ``F.linear`` into `rows_matvec` (int8 linears do the same themselves);
- float routed experts at up to `TRACED_MAX_ROWS` rows (int8 ones at up to 8,
  `moelab.quant.experts`) run `expert_rows`, each row reading its own expert's matrices
  through a gather that inductor fuses into the reduction;
- `order_of_distinct` sorts one token's experts without a ``sort`` call.

One catch makes or breaks all of it: inductor inlines a reduction's pointwise producer into
the reduction, so a normalised input would be recomputed once per output row (measured: a
4.5 ms step became 15.8 ms). `realized` keeps such an input in a buffer.

These run eagerly too (the tests compare them with ``F.linear`` and the segmented kernel),
but eagerly they materialise the ``[R, O, I]`` product: they are for compiled graphs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from moelab.moe.cpu_kernels import act_forward

# Rows up to which traced float experts beat the per-expert BLAS GEMMs in a compiled step.
# Each row reads its expert's weights, so an expert chosen by several rows is read several
# times; still faster at every batch measured (the 207M benchmark model, 1 thread, ms a
# step, op -> traced: fp32 batch 2 37.2 -> 25.2, 4 50.5 -> 31.9, 8 82.1 -> 51.7, 16 (32
# rows) 103.3 -> 90.9; bf16 batch 4 24.9 -> 15.2, 8 42.8 -> 25.5). int8 experts have their
# own limit (`moelab.quant.experts.TRACED_INT8_MAX_ROWS`): torch's int8 kernel is faster.
TRACED_MAX_ROWS = 32


def realized(x: torch.Tensor) -> torch.Tensor:
    """``x``, kept in a buffer by a compiled graph: inductor's lowering of ``as_strided``
    realises its input, where it would otherwise inline ``x``'s computation into every
    consumer (a no-op eagerly)."""
    if torch.compiler.is_compiling():
        x = x.contiguous()
        return torch.as_strided(x, x.shape, x.stride())
    return x


def rows_matvec(x_RI: torch.Tensor, w_ROI: torch.Tensor, scale_RO: torch.Tensor | None = None) -> torch.Tensor:
    """``y_RO = (w_ROI[r] @ x_RI[r]) * scale_RO[r]``: row r with its own matrix (a broadcast
    ``[1, O, I]`` for a linear), summed in float32 at least whatever the weights' dtype
    (int8, bf16, fp32; float64 stays float64), as one reduction inductor compiles."""
    acc = torch.promote_types(x_RI.dtype, torch.float32)
    if w_ROI.is_floating_point():
        acc = torch.promote_types(acc, w_ROI.dtype)
    x_R1I = realized(x_RI.to(acc)).unsqueeze(1)
    y_RO = (x_R1I * w_ROI.to(acc)).sum(-1)
    return y_RO if scale_RO is None else y_RO * scale_RO.to(acc)


def one_row_linear(x: torch.Tensor, weight_OI: torch.Tensor, bias_O: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for an ``x`` of one row (any leading dims of size 1),
    as `rows_matvec`, in ``x``'s dtype."""
    y_1O = rows_matvec(x.reshape(1, -1), weight_OI.unsqueeze(0))
    if bias_O is not None:
        y_1O = y_1O + bias_O.to(y_1O.dtype)
    return y_1O.to(x.dtype).reshape(*x.shape[:-1], weight_OI.shape[0])


class OneRowLinears(TorchFunctionMode):
    """While active (the compiled decode step enters it as it is traced): every
    ``F.linear`` of one row with a float weight on the CPU is `one_row_linear`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if x.numel() == x.shape[-1] and weight.is_floating_point() and x.device.type == "cpu":
                return one_row_linear(x, weight, bias)
        return func(*args, **kwargs)


def order_of_distinct(expert_A: torch.Tensor) -> torch.Tensor:
    """``argsort(expert_A)`` for distinct values (one token's top-k), as comparisons and
    sums that a compiled graph fuses into its own loops instead of calling ``sort``: the
    rank of each value is how many are smaller, and ``order[r]`` the position of rank r."""
    A = expert_A.shape[0]
    rank_A = (expert_A.unsqueeze(0) < expert_A.unsqueeze(1)).sum(1)
    pos_A = torch.arange(A, device=expert_A.device)
    return ((rank_A.unsqueeze(0) == pos_A.unsqueeze(1)) * pos_A.unsqueeze(0)).sum(1)


def expert_of_rows(counts_E: torch.Tensor, num_rows: int) -> torch.Tensor:
    """The expert of each of ``num_rows`` rows grouped by expert (``counts_E`` rows each):
    the number of experts whose rows end at or before the row. The running sum of the
    counts is a sum over a triangle, which a graph fuses, not a ``cumsum`` call."""
    e_E = torch.arange(counts_E.shape[0], device=counts_E.device)
    ends_E = (counts_E.unsqueeze(0) * (e_E.unsqueeze(0) <= e_E.unsqueeze(1))).sum(1)
    return (ends_E.unsqueeze(0) <= torch.arange(num_rows, device=counts_E.device).unsqueeze(1)).sum(1)


def expert_rows(
    x_AD: torch.Tensor,
    counts_E: torch.Tensor,
    weight_A: torch.Tensor,
    w_in_EHD: torch.Tensor,
    w_out_EDF: torch.Tensor,
    activation: str,
    in_scale_EH: torch.Tensor | None = None,
    out_scale_ED: torch.Tensor | None = None,
    act_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``y_A = w_A * down_e(act(up_e(x_A)))`` for rows grouped by expert, each row reading
    its own expert's matrices (int8 with their per-row scales, or float). ``act_dtype``:
    the dtype the GEMM inputs are rounded to (bf16 for the int8 kernel's contract; None:
    float32 throughout). Returns ``x_AD``'s dtype."""
    expert_A = expert_of_rows(counts_E, x_AD.shape[0])

    def pick(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[expert_A]

    def gemm_input(t: torch.Tensor) -> torch.Tensor:
        return t if act_dtype is None else t.to(act_dtype)

    h_AH = rows_matvec(gemm_input(x_AD), w_in_EHD[expert_A], pick(in_scale_EH))
    if act_dtype is not None:
        h_AH = h_AH.to(act_dtype).float()
    a_AF = act_forward(h_AH, activation, inplace=False) * weight_A.to(h_AH.dtype).unsqueeze(-1)
    y_AD = rows_matvec(gemm_input(a_AF), w_out_EDF[expert_A], pick(out_scale_ED))
    if act_dtype is not None:
        y_AD = y_AD.to(act_dtype)
    return y_AD.to(x_AD.dtype)
