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

# ATen runs index_select/index_add_ with OpenMP once an op has more than 32768 elements
# (at::internal::GRAIN_SIZE). For decode-sized ops that costs more than the work, and on a
# shared 2-core machine a worker that is descheduled stalls the op for a whole scheduler
# tick: a [128, 512] index_add_ took 140 ms with 2 threads vs 11 us with 1 (measured
# here). Small gathers/scatters are therefore issued in pieces below the grain size,
# which ATen runs serially; large ones stay one call (the work dwarfs the sync). At most
# 4 pieces: at training shapes (tiny-moe, ~700-row chunks of D=128) 16 pieces of 128
# rows cost ~1 ms more per layer fwd+bwd than one parallel call (measured, interleaved).
_SERIAL_ELEMS = 16384
_MAX_PIECES = 4


def _row_pieces(num_rows: int, row_elems: int) -> list[tuple[int, int]] | None:
    """Row ranges that each stay below the parallel grain, or None for one call."""
    rows = max(1, _SERIAL_ELEMS // max(1, row_elems))
    if num_rows <= rows or num_rows > rows * _MAX_PIECES:
        return None
    return [(i, min(i + rows, num_rows)) for i in range(0, num_rows, rows)]


def gather_rows(x_TD: torch.Tensor, idx_R: torch.Tensor) -> torch.Tensor:
    """``x_TD[idx_R]`` (no autograd), in serial pieces when that is faster (see above)."""
    pieces = _row_pieces(idx_R.shape[0], x_TD.shape[1])
    if pieces is None:
        return x_TD.index_select(0, idx_R)
    out_RD = x_TD.new_empty(idx_R.shape[0], x_TD.shape[1])
    for a, b in pieces:
        torch.index_select(x_TD, 0, idx_R[a:b], out=out_RD[a:b])
    return out_RD


def scatter_add_rows(out_TD: torch.Tensor, idx_R: torch.Tensor, y_RD: torch.Tensor) -> None:
    """``out_TD[idx_R] += y_RD`` in place, rows in order (deterministic sums)."""
    pieces = _row_pieces(idx_R.shape[0], y_RD.shape[1])
    if pieces is None:
        out_TD.index_add_(0, idx_R, y_RD)
        return
    for a, b in pieces:
        out_TD.index_add_(0, idx_R[a:b], y_RD[a:b])


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


def per_expert_rows(
    x: torch.Tensor,
    counts_E: torch.Tensor,
    num_rows: int,
    d_out: int,
    expert_fn,
    token_idx_A: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The per-expert loop shared by experts that run one expert at a time (quantised,
    offloaded): ``x_AD -> y_AD`` for rows grouped by expert, or with ``token_idx_A``
    (gather and combine fused) ``x_TD -> y_TD``.

    ``expert_fn(e, x_RI, rows) -> y_RO`` runs expert e on its R rows (``rows``: their slice
    of the assignments, for the combine weights). One host sync for the layer; at one token
    (decode) every row is token 0, so no gather and the outputs just add.
    """
    fused = token_idx_A is not None
    one_token = fused and x.shape[0] == 1
    out = torch.zeros(x.shape[0] if fused else num_rows, d_out, dtype=out_dtype or x.dtype, device=x.device)
    a = 0
    for e, n in enumerate(counts_E.tolist()):
        if not n:
            continue
        rows = slice(a, a + n)
        a += n
        if one_token:
            x_RI = x.expand(n, -1)
        elif fused:
            x_RI = gather_rows(x, token_idx_A[rows])
        else:
            x_RI = x[rows]
        y_RO = expert_fn(e, x_RI, rows)
        if one_token:
            out.add_(y_RO.sum(0, keepdim=True) if n > 1 else y_RO)
        elif fused:
            scatter_add_rows(out, token_idx_A[rows], y_RO)
        else:
            out[rows] = y_RO
    return out


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
    x: torch.Tensor,
    w_in_EHD: torch.Tensor,
    w_out_EDF: torch.Tensor,
    weight_A: torch.Tensor,
    chunks: list[Chunk],
    activation: str,
    h_AH: torch.Tensor | None,
    token_idx_A: torch.Tensor | None,
) -> torch.Tensor:
    """``y_A = (act(x_A W_in[e]^T) * w_A) W_out[e]^T`` chunk by chunk; ``h`` kept in
    ``h_AH`` when given (for the backward).

    ``token_idx_A`` None: ``x`` is ``x_AD`` (rows grouped by expert) and the result is
    ``y_AD``. Given: ``x`` is ``x_TD``, each chunk's rows are gathered from it and its
    outputs scatter-added into ``y_TD`` while the chunk is in cache (the local
    dispatcher's fused path: at fine-grained shapes A = T*K rows of x_AD and y_AD are
    64 MB each, and writing them out costs 20-33% of the forward, measured).
    """
    fused = token_idx_A is not None
    D = w_out_EDF.shape[1]
    out = torch.zeros_like(x) if fused else x.new_empty(x.shape[0], D)
    w_A1 = weight_A.to(x.dtype).unsqueeze(-1)
    for b0, b1, segs in chunks:
        if fused:
            tok_R = token_idx_A[b0:b1]
            x_RD = gather_rows(x, tok_R)
        else:
            x_RD = x[b0:b1]
        h_RH = seg_mm(x_RD, w_in_EHD, segs, transpose=True,
                      out_RO=None if h_AH is None else h_AH[b0:b1], grouped=h_AH is None)
        a_RF = act_forward(h_RH, activation).mul_(w_A1[b0:b1])
        if fused:
            scatter_add_rows(out, tok_R, seg_mm(a_RF, w_out_EDF, segs, transpose=True))
        else:
            seg_mm(a_RF, w_out_EDF, segs, transpose=True, out_RO=out[b0:b1])
    return out


class SegmentedFFN(torch.autograd.Function):
    """W_in -> act -> (x combine weight) -> W_out over rows grouped by expert, as one
    autograd node; with ``token_idx_A`` the gather before and the scatter-add after are
    fused in (rows gathered from ``x_TD`` and outputs summed into ``y_TD`` chunk by chunk).

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
    def forward(ctx, x, w_in_EHD, w_out_EDF, weight_A, token_idx_A, counts, activation, save):
        # ``save``: grad mode is on at the call site (inside forward it is always off,
        # and ``needs_input_grad`` ignores `torch.no_grad()`).
        A, H = weight_A.shape[0], w_in_EHD.shape[1]
        chunks = chunks_of(counts, H * x.element_size())
        h_AH = x.new_empty(A, H) if save else None
        y = _forward_chunks(x, w_in_EHD, w_out_EDF, weight_A, chunks, activation, h_AH, token_idx_A)
        if save:
            ctx.save_for_backward(x, w_in_EHD, w_out_EDF, weight_A, h_AH, token_idx_A)
            ctx.chunks, ctx.counts, ctx.activation = chunks, counts, activation
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, w_in_EHD, w_out_EDF, weight_A, h_AH, token_idx_A = ctx.saved_tensors
        grads = segmented_ffn_backward(grad, x, w_in_EHD, w_out_EDF, weight_A, h_AH, token_idx_A, ctx.chunks,
                                       ctx.counts, ctx.activation, tuple(ctx.needs_input_grad[:4]))
        return *grads, None, None, None, None


def segmented_ffn_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    w_in_EHD: torch.Tensor,
    w_out_EDF: torch.Tensor,
    weight_A: torch.Tensor,
    h_AH: torch.Tensor,
    token_idx_A: torch.Tensor | None,
    chunks: list[Chunk],
    counts: list[int],
    activation: str,
    needs: tuple[bool, bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """`SegmentedFFN`'s backward (its docstring has the maths): ``(dx, dW_in, dW_out,
    dweight_A)``, each None where `needs` says its input needs no gradient. Also the
    backward of the opaque training op (`moelab.moe.ops`)."""
    fused = token_idx_A is not None
    need_x, need_win, need_wout, need_w = needs
    w_A1 = weight_A.to(h_AH.dtype).unsqueeze(-1)
    grad = grad.contiguous()
    dx = (torch.zeros_like(x) if fused else torch.empty_like(x)) if need_x else None
    dw_in = _zero_unused(torch.empty_like(w_in_EHD), counts) if need_win else None
    dw_out = _zero_unused(torch.empty_like(w_out_EDF), counts) if need_wout else None
    dweight_A = h_AH.new_empty(h_AH.shape[0]) if need_w else None
    for b0, b1, segs in chunks:
        tok_R = token_idx_A[b0:b1] if fused else None
        g_RD = gather_rows(grad, tok_R) if fused else grad[b0:b1]
        h_RH = h_AH[b0:b1]
        act_RF, silu_RF = _act_recompute(h_RH, activation)  # recomputed, not saved
        if need_wout:
            _seg_weight_grad(dw_out, g_RD, act_RF * w_A1[b0:b1], segs)
        if not (need_x or need_win or need_w):
            continue
        u_RF = seg_mm(g_RD, w_out_EDF, segs, transpose=False)
        if need_w:
            dweight_A[b0:b1] = (act_RF * u_RF).sum(dim=-1)
        if need_x or need_win:
            dh_RH = _act_backward(u_RF.mul_(w_A1[b0:b1]), h_RH, activation, silu_RF)
            if need_win:
                _seg_weight_grad(dw_in, dh_RH, gather_rows(x, tok_R) if fused else x[b0:b1], segs)
            if need_x and fused:
                scatter_add_rows(dx, tok_R, seg_mm(dh_RH, w_in_EHD, segs, transpose=False))
            elif need_x:
                seg_mm(dh_RH, w_in_EHD, segs, transpose=False, out_RO=dx[b0:b1])
    if dweight_A is not None:
        dweight_A = dweight_A.to(weight_A.dtype)
    return dx, dw_in, dw_out, dweight_A


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


def _one_token(
    x_1D: torch.Tensor, w_in_EHD: torch.Tensor, w_out_EDF: torch.Tensor, weight_A: torch.Tensor,
    counts: list[int], activation: str,
) -> torch.Tensor:
    """``sum_e w_e * down_e(act(W_in[e] x))`` over the experts of one token (no gather,
    no scatter: at decode those ops cost more than the GEMVs they organise)."""
    out_1D = None
    a = 0
    for e, n in enumerate(counts):
        if n:
            a_1F = act_forward(F.linear(x_1D, w_in_EHD[e]), activation).mul_(weight_A[a].to(x_1D.dtype))
            y_1D = F.linear(a_1F, w_out_EDF[e])
            out_1D = y_1D if out_1D is None else out_1D.add_(y_1D)
            a += 1
    return out_1D if out_1D is not None else torch.zeros_like(x_1D)


def segmented_ffn(
    x: torch.Tensor,
    w_in_EHD: torch.Tensor,
    w_out_EDF: torch.Tensor,
    weight_A: torch.Tensor,
    counts_E: torch.Tensor,
    activation: str,
    token_idx_A: torch.Tensor | None = None,
) -> torch.Tensor:
    """The segmented expert FFN, with autograd when needed: ``x_AD -> y_AD``, or with
    ``token_idx_A`` (fused gather and scatter) ``x_TD -> y_TD``."""
    counts = counts_E.tolist()  # one host sync for the whole layer
    inputs = (x, w_in_EHD, w_out_EDF, weight_A)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return SegmentedFFN.apply(*inputs, token_idx_A, counts, activation, True)
    return segmented_ffn_no_grad(x, w_in_EHD, w_out_EDF, weight_A, counts, activation, token_idx_A)


def segmented_ffn_no_grad(
    x: torch.Tensor,
    w_in_EHD: torch.Tensor,
    w_out_EDF: torch.Tensor,
    weight_A: torch.Tensor,
    counts: list[int],
    activation: str,
    token_idx_A: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inference: GEMV pairs when every expert has at most one row, chunks otherwise."""
    if counts and max(counts) <= 1:
        if token_idx_A is None:
            return _one_row_each(x, w_in_EHD, w_out_EDF, weight_A, counts, activation)
        if x.shape[0] == 1:  # one token, fused: its expert outputs summed as they come
            return _one_token(x, w_in_EHD, w_out_EDF, weight_A, counts, activation)
        y_AD = _one_row_each(gather_rows(x, token_idx_A), w_in_EHD, w_out_EDF, weight_A, counts, activation)
        out_TD = torch.zeros_like(x)
        scatter_add_rows(out_TD, token_idx_A, y_AD)
        return out_TD
    chunks = chunks_of(counts, w_in_EHD.shape[1] * x.element_size())
    return _forward_chunks(x, w_in_EHD, w_out_EDF, weight_A, chunks, activation, None, token_idx_A)
