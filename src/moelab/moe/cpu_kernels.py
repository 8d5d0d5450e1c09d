"""The segmented expert FFN: per-expert GEMMs over contiguous row segments (tuned on CPU).

Legend: A rows (kept assignments, grouped by expert), D model dim, F expert hidden dim,
E experts, H = 2F (swiglu) or F (gelu) rows of the input projection, R rows of one chunk.

Input rows arrive grouped by expert (`moelab.moe.dispatch`): expert e owns the rows
``sum(counts[:e]) : sum(counts[:e+1])``. Each expert's rows go through
``down(act(x W_in[e]^T) * w)``: one GEMM pair per expert with at least one row, so an
expert that received nothing costs nothing. One host sync per layer (the counts).

This is the fast path of the "segmented" experts backend (`moelab.moe.experts`); the
readable reference is the "loop" backend there, and tests compare the two.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Rows are processed in chunks of whole experts, each chunk holding about this many bytes
# of pre-activation ``h``. Measured on the 2-core dev CPU, running GEMM -> activation ->
# GEMM chunk by chunk while the chunk is in cache beats doing each step over all A rows
# (the A x 2F intermediates are 10-100 MB at training shapes) by ~20% in the forward
# (benchmarks/moe_layer.py, fine and very_fine shapes); small layers (decode) are one
# chunk, which keeps the op count low.
CHUNK_BYTES = 1 << 20

Segment = tuple[int, int, int]  # (expert, first row, end row), rows relative to the chunk
Chunk = tuple[int, int, list[Segment]]  # (first row, end row, segments), rows of A


def chunks_of(counts: list[int], row_bytes: int, chunk_bytes: int | None = None) -> list[Chunk]:
    """Group consecutive non-empty experts into chunks of about ``chunk_bytes`` (default
    `CHUNK_BYTES`) of ``h``."""
    chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    chunks: list[Chunk] = []
    segs: list[Segment] = []
    b0 = start = 0
    for e, n in enumerate(counts):
        if not n:
            continue
        segs.append((e, start - b0, start + n - b0))
        start += n
        if (start - b0) * row_bytes >= chunk_bytes:
            chunks.append((b0, start, segs))
            segs, b0 = [], start
    if segs:
        chunks.append((b0, start, segs))
    return chunks


# `torch._grouped_mm` (torch >= 2.8) on CPU: one call for all experts of a chunk. Measured
# here (MoE layer, interleaved A/B): 7-10% faster at decode (8-16 tokens, D=512, F=1792),
# but 4-7% slower on the whole fwd+bwd at tiny-moe training shapes (~700-row chunks), so
# only small chunks take it. float32/bf16/fp16 only (the float64 reference tests take
# the loop; a float32 test compares the two) and rows must be 16-byte aligned.
GROUPED_MM = hasattr(torch, "_grouped_mm")
GROUPED_MM_MAX_ROWS = 128


def use_grouped_mm(a_RI: torch.Tensor, w_EIO: torch.Tensor) -> bool:
    # Under torch.compile the op's meta function accepts bf16 only (torch 2.13): eager ATen then.
    if torch.compiler.is_compiling():
        return False
    if not GROUPED_MM or a_RI.shape[0] > GROUPED_MM_MAX_ROWS or a_RI.device.type != "cpu" or a_RI.dtype != w_EIO.dtype:
        return False
    if a_RI.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    esz = a_RI.element_size()
    return a_RI.stride(-1) == 1 and (a_RI.stride(0) * esz) % 16 == 0 and (w_EIO.shape[1] * esz) % 16 == 0 and (
        w_EIO.shape[2] * esz) % 16 == 0


def _group_offsets(segs: list[Segment], num_experts: int, device: torch.device) -> torch.Tensor:
    """End row of each expert's group within the chunk (experts absent from it: empty groups)."""
    ends = [0] * num_experts
    for e, _, t in segs:
        ends[e] = t
    for e in range(1, num_experts):  # an absent expert's group ends where the previous one did
        ends[e] = max(ends[e], ends[e - 1])
    return torch.tensor(ends, dtype=torch.int32, device=device)


def seg_mm(
    a_RI: torch.Tensor,
    w_EOI: torch.Tensor,
    segs: list[Segment],
    *,
    transpose: bool,
    out_RO: torch.Tensor | None = None,
    grouped: bool = True,
) -> torch.Tensor:
    """Per-expert GEMM over a chunk: ``out[seg] = a[seg] @ w[e]^T`` (or ``@ w[e]``).

    Where ``grouped`` and `use_grouped_mm` allow, the whole chunk is one
    ``torch._grouped_mm`` call (ATen loops over the groups in C++), copied into ``out_RO``
    when one is given; otherwise one ``torch.mm`` per expert, written into ``out_RO``.
    Both compute the same products (tested against each other).
    """
    w_view = w_EOI.transpose(1, 2) if transpose else w_EOI  # [E, I, O]
    if grouped and use_grouped_mm(a_RI, w_view):
        r = torch._grouped_mm(a_RI, w_view, offs=_group_offsets(segs, w_EOI.shape[0], a_RI.device))
        return r if out_RO is None else out_RO.copy_(r)
    if out_RO is None:
        out_RO = a_RI.new_empty(a_RI.shape[0], w_view.shape[2])
    for e, s, t in segs:
        torch.mm(a_RI[s:t], w_EOI[e].t() if transpose else w_EOI[e], out=out_RO[s:t])
    return out_RO


def _seg_weight_grad(
    dw_EOI: torch.Tensor, dy_RO: torch.Tensor, x_RI: torch.Tensor, segs: list[Segment]
) -> None:
    """``dW[e] = dy[seg]^T @ x[seg]`` for each expert of the chunk (each expert is in one chunk)."""
    for e, s, t in segs:
        torch.mm(dy_RO[s:t].t(), x_RI[s:t], out=dw_EOI[e])


def act_forward(h_AH: torch.Tensor, activation: str, *, inplace: bool = True) -> torch.Tensor:
    """``silu(gate) * up`` (swiglu, ``h = [gate | up]``) or ``gelu(h)``. ``inplace``: the
    product reuses silu's output buffer (no autograd here: the kernels' own backward)."""
    if activation == "swiglu":
        gate_AF, up_AF = h_AH.chunk(2, dim=-1)
        silu_AF = F.silu(gate_AF)
        return silu_AF.mul_(up_AF) if inplace else silu_AF * up_AF
    return F.gelu(h_AH)


def _act_recompute(h_AH: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``act(h)`` for the backward, plus ``silu(gate)`` (swiglu) so `_act_backward` reuses it."""
    if activation != "swiglu":
        return F.gelu(h_AH), None
    gate_AF, up_AF = h_AH.chunk(2, dim=-1)
    silu_AF = F.silu(gate_AF)
    return silu_AF * up_AF, silu_AF


def _act_backward(
    dact_AF: torch.Tensor, h_AH: torch.Tensor, activation: str, silu_gate_AF: torch.Tensor | None
) -> torch.Tensor:
    """Gradient wrt the pre-activation ``h`` given the gradient wrt ``act(h)``; swiglu takes
    the ``silu(gate)`` that `_act_recompute` already computed."""
    if activation != "swiglu":
        return torch.ops.aten.gelu_backward(dact_AF, h_AH)
    assert silu_gate_AF is not None
    gate_AF, up_AF = h_AH.chunk(2, dim=-1)
    Fh = gate_AF.shape[1]
    dh_AH = h_AH.new_empty(h_AH.shape)
    torch.mul(dact_AF, silu_gate_AF, out=dh_AH[:, Fh:])  # d up = dact * silu(gate)
    dh_AH[:, :Fh] = torch.ops.aten.silu_backward(dact_AF * up_AF, gate_AF)  # d gate
    return dh_AH


def _zero_unused(dw_EOI: torch.Tensor, counts: list[int]) -> torch.Tensor:
    for e, n in enumerate(counts):
        if not n:
            dw_EOI[e].zero_()
    return dw_EOI


def _forward_chunks(
    x_AD: torch.Tensor,
    w_in_EHD: torch.Tensor,
    w_out_EDF: torch.Tensor,
    weight_A: torch.Tensor,
    chunks: list[Chunk],
    activation: str,
    h_AH: torch.Tensor | None,
) -> torch.Tensor:
    """``y_A = (act(x_A W_in[e]^T) * w_A) W_out[e]^T`` chunk by chunk; ``h`` kept in
    ``h_AH`` when given (for the backward)."""
    y_AD = x_AD.new_empty(x_AD.shape[0], w_out_EDF.shape[1])
    w_A1 = weight_A.to(x_AD.dtype).unsqueeze(-1)
    for b0, b1, segs in chunks:
        h_RH = seg_mm(x_AD[b0:b1], w_in_EHD, segs, transpose=True,
                      out_RO=None if h_AH is None else h_AH[b0:b1], grouped=h_AH is None)
        a_RF = act_forward(h_RH, activation).mul_(w_A1[b0:b1])
        seg_mm(a_RF, w_out_EDF, segs, transpose=True, out_RO=y_AD[b0:b1])
    return y_AD


class SegmentedFFN(torch.autograd.Function):
    """W_in -> act -> (x combine weight) -> W_out over rows grouped by expert, as one
    autograd node.

    Forward (H = 2F for swiglu, F for gelu):
        h_A = x_A W_in[e]^T;  a_A = act(h_A) * w_A;  y_A = a_A W_out[e]^T
    The combine weight is folded into the activation ([A, F]) rather than applied to the
    expert output ([A, D]): one fewer pass over the largest intermediate when F < D.
    Rows are processed in cache-sized chunks of whole experts (`CHUNK_BYTES`).

    Backward saves only ``h`` (plus the inputs; nothing at all when no gradient is needed)
    and recomputes ``act(h)``; with g_A = dy_A and u_A = g_A W_out[e]:
        dw_A = act(h_A) . u_A            (the router's gradient through the combine weight)
        dW_out[e] = g_e^T (act(h_e) * w_e)
        dh_A = act'(h_A) (w_A u_A);  dW_in[e] = dh_e^T x_e;  dx_A = dh_A W_in[e]
    Weight gradients are returned stacked, [E, ...], written expert by expert: indexing
    a stacked parameter per expert (``w[e]``) under autograd instead materialises a full
    zero [E, ...] gradient per expert, O(E^2) memory traffic (seconds per step at E=128).
    First-order only.
    """

    @staticmethod
    def forward(ctx, x_AD, w_in_EHD, w_out_EDF, weight_A, counts, activation, save):
        # ``save``: grad mode is on at the call site (inside forward it is always off,
        # and ``needs_input_grad`` ignores `torch.no_grad()`).
        A, H = x_AD.shape[0], w_in_EHD.shape[1]
        chunks = chunks_of(counts, H * x_AD.element_size())
        h_AH = x_AD.new_empty(A, H) if save else None
        y_AD = _forward_chunks(x_AD, w_in_EHD, w_out_EDF, weight_A, chunks, activation, h_AH)
        if save:
            ctx.save_for_backward(x_AD, w_in_EHD, w_out_EDF, weight_A, h_AH)
            ctx.chunks, ctx.counts, ctx.activation = chunks, counts, activation
        return y_AD

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_AD):
        x_AD, w_in_EHD, w_out_EDF, weight_A, h_AH = ctx.saved_tensors
        need_x, need_win, need_wout, need_w = ctx.needs_input_grad[:4]
        w_A1 = weight_A.to(h_AH.dtype).unsqueeze(-1)
        g_AD = g_AD.contiguous()
        dx_AD = torch.empty_like(x_AD) if need_x else None
        dw_in = _zero_unused(torch.empty_like(w_in_EHD), ctx.counts) if need_win else None
        dw_out = _zero_unused(torch.empty_like(w_out_EDF), ctx.counts) if need_wout else None
        dweight_A = h_AH.new_empty(h_AH.shape[0]) if need_w else None
        for b0, b1, segs in ctx.chunks:
            g_RD = g_AD[b0:b1]
            h_RH = h_AH[b0:b1]
            act_RF, silu_RF = _act_recompute(h_RH, ctx.activation)  # recomputed, not saved
            if need_wout:
                _seg_weight_grad(dw_out, g_RD, act_RF * w_A1[b0:b1], segs)
            if not (need_x or need_win or need_w):
                continue
            u_RF = seg_mm(g_RD, w_out_EDF, segs, transpose=False)
            if need_w:
                dweight_A[b0:b1] = (act_RF * u_RF).sum(dim=-1)
            if need_x or need_win:
                dh_RH = _act_backward(u_RF.mul_(w_A1[b0:b1]), h_RH, ctx.activation, silu_RF)
                if need_win:
                    _seg_weight_grad(dw_in, dh_RH, x_AD[b0:b1], segs)
                if need_x:
                    seg_mm(dh_RH, w_in_EHD, segs, transpose=False, out_RO=dx_AD[b0:b1])
        if dweight_A is not None:
            dweight_A = dweight_A.to(weight_A.dtype)
        return dx_AD, dw_in, dw_out, dweight_A, None, None, None


def _one_row_each(
    x_AD: torch.Tensor, w_in_EHD: torch.Tensor, w_out_EDF: torch.Tensor, weight_A: torch.Tensor,
    counts: list[int], activation: str,
) -> torch.Tensor:
    """Every expert has at most one row (one token at decode): a GEMV pair per row.

    At one token a GEMV pair per chosen expert beats ``torch._grouped_mm`` (15.2 vs
    16.6 ms per decode step of the 213M benchmark model, 2 threads, side by side).
    """
    y_AD = x_AD.new_empty(x_AD.shape[0], w_out_EDF.shape[1])
    a = 0
    for e, n in enumerate(counts):
        if n:
            a_1F = act_forward(F.linear(x_AD[a : a + 1], w_in_EHD[e]), activation).mul_(weight_A[a].to(x_AD.dtype))
            torch.mm(a_1F, w_out_EDF[e].t(), out=y_AD[a : a + 1])
            a += 1
    return y_AD


def segmented_ffn(
    x_AD: torch.Tensor,
    w_in_EHD: torch.Tensor,
    w_out_EDF: torch.Tensor,
    weight_A: torch.Tensor,
    counts_E: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    """The segmented expert FFN of rows grouped by expert, with autograd when needed."""
    counts = counts_E.tolist()  # one host sync for the whole layer
    inputs = (x_AD, w_in_EHD, w_out_EDF, weight_A)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return SegmentedFFN.apply(*inputs, counts, activation, True)
    return segmented_ffn_no_grad(x_AD, w_in_EHD, w_out_EDF, weight_A, counts, activation)


def segmented_ffn_no_grad(
    x_AD: torch.Tensor,
    w_in_EHD: torch.Tensor,
    w_out_EDF: torch.Tensor,
    weight_A: torch.Tensor,
    counts: list[int],
    activation: str,
) -> torch.Tensor:
    """Inference: GEMV pairs when every expert has at most one row, chunks otherwise."""
    if counts and max(counts) <= 1:
        return _one_row_each(x_AD, w_in_EHD, w_out_EDF, weight_A, counts, activation)
    chunks = chunks_of(counts, w_in_EHD.shape[1] * x_AD.element_size())
    return _forward_chunks(x_AD, w_in_EHD, w_out_EDF, weight_A, chunks, activation, None)
