"""Expert FFNs: the stacked routed experts and the dense FFN (shared experts, dense layers).

Legend: T tokens, D model dim, F expert hidden dim, E experts, A kept assignments,
H = 2F (swiglu) or F (gelu) rows of the input projection, R rows of one chunk.

Routed expert weights are stacked, one tensor per projection, in the in-memory layout of
current HF transformers so checkpoint mapping is a rename:
  swiglu: ``gate_up_proj [E, 2F, D]`` (gate rows first, then up), ``down_proj [E, D, F]``
  gelu:   ``up_proj [E, F, D]``, ``down_proj [E, D, F]``
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moelab.moe.dispatch import Assignments, DispatchPlan


def _activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h)


# Rows of the sorted assignments are processed in chunks of whole experts, each chunk
# holding about this many bytes of pre-activation ``h``. Measured on the 2-core dev CPU,
# running gather -> GEMM -> activation -> GEMM -> scatter chunk by chunk while the chunk
# is in cache beats doing each step over all A rows (the A x 2F intermediates are
# 10-100 MB at training shapes) by ~20% in the forward (benchmarks/moe_layer.py, fine and
# very_fine shapes); small layers (decode) are one chunk, which keeps the op count low.
CHUNK_BYTES = 1 << 20

Segment = tuple[int, int, int]  # (expert, first row, end row), rows relative to the chunk
Chunk = tuple[int, int, list[Segment]]  # (first row, end row, segments), rows of the sorted A


def _chunks(counts: list[int], row_bytes: int, chunk_bytes: int) -> list[Chunk]:
    """Group consecutive non-empty experts into chunks of about ``chunk_bytes`` of ``h``."""
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
# the loop; a float32 test compares the two) and rows must be 16-byte aligned. Not used
# on CUDA: it needs bf16 and recent GPUs there, and it is untested on our side.
GROUPED_MM = hasattr(torch, "_grouped_mm")
GROUPED_MM_MAX_ROWS = 128


def _use_grouped_mm(a_RI: torch.Tensor, w_EIO: torch.Tensor) -> bool:
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


def _seg_mm(
    a_RI: torch.Tensor,
    w_EOI: torch.Tensor,
    segs: list[Segment],
    *,
    transpose: bool,
    out_RO: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-expert GEMM over a chunk: ``out[seg] = a[seg] @ w[e]^T`` (or ``@ w[e]``), written in place.

    Without a given output buffer, and where `_use_grouped_mm` allows, the whole chunk is
    one ``torch._grouped_mm`` call (ATen loops over the groups in C++); otherwise one
    ``torch.mm`` per expert. Both compute the same products (tested against each other).
    """
    w_view = w_EOI.transpose(1, 2) if transpose else w_EOI  # [E, I, O]
    if out_RO is None and _use_grouped_mm(a_RI, w_view):
        return torch._grouped_mm(a_RI, w_view, offs=_group_offsets(segs, w_EOI.shape[0], a_RI.device))
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


def _gather_rows(x_TD: torch.Tensor, idx_R: torch.Tensor) -> torch.Tensor:
    pieces = _row_pieces(idx_R.shape[0], x_TD.shape[1])
    if pieces is None:
        return x_TD.index_select(0, idx_R)
    out_RD = x_TD.new_empty(idx_R.shape[0], x_TD.shape[1])
    for a, b in pieces:
        torch.index_select(x_TD, 0, idx_R[a:b], out=out_RD[a:b])
    return out_RD


def _scatter_add_rows(out_TD: torch.Tensor, idx_R: torch.Tensor, y_RD: torch.Tensor) -> None:
    pieces = _row_pieces(idx_R.shape[0], y_RD.shape[1])
    if pieces is None:
        out_TD.index_add_(0, idx_R, y_RD)
        return
    for a, b in pieces:
        out_TD.index_add_(0, idx_R[a:b], y_RD[a:b])


def _act_forward(h_AH: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "swiglu":
        gate_AF, up_AF = h_AH.chunk(2, dim=-1)
        return F.silu(gate_AF).mul_(up_AF)
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


class _ExpertFFN(torch.autograd.Function):
    """gather -> W_in -> act -> (x combine weight) -> W_out -> scatter-add, as one autograd node.

    Forward, with rows sorted by expert (H = 2F for swiglu, F for gelu):
        x_A = x[token_A];  h_A = x_A W_in[e]^T;  a_A = act(h_A) * w_A;  y = sum_A a_A W_out[e]^T
    The combine weight is folded into the activation ([A, F]) rather than applied to the
    expert output ([A, D]): one fewer pass over the largest intermediate when F < D.
    Rows are processed in cache-sized chunks of whole experts (`CHUNK_BYTES`).

    Backward saves only ``h`` (plus the inputs; nothing at all when no gradient is needed)
    and recomputes ``act(h)``; with g_A = dy[token_A] and u_A = g_A W_out[e]:
        dw_A = act(h_A) . u_A            (the router's gradient through the combine weight)
        dW_out[e] = g_e^T (act(h_e) * w_e)
        dh_A = act'(h_A) (w_A u_A);  dW_in[e] = dh_e^T x_e;  dx = scatter-add(dh_A W_in[e])
    Weight gradients are returned stacked, [E, ...], written expert by expert: indexing
    a stacked parameter per expert (``w[e]``) under autograd instead materialises a full
    zero [E, ...] gradient per expert, O(E^2) memory traffic (seconds per step at E=128).
    First-order only.
    """

    @staticmethod
    def forward(ctx, x_TD, w_in_EHD, w_out_EDF, weight_A, token_idx_A, counts, activation, save):
        # ``save``: grad mode is on at the call site (inside forward it is always off,
        # and ``needs_input_grad`` ignores `torch.no_grad()`).
        A, H = token_idx_A.shape[0], w_in_EHD.shape[1]
        chunks = _chunks(counts, H * x_TD.element_size(), CHUNK_BYTES)
        w_A1 = weight_A.to(x_TD.dtype).unsqueeze(-1)
        h_AH = x_TD.new_empty(A, H) if save else None
        out_TD = torch.zeros_like(x_TD)
        for b0, b1, segs in chunks:
            tok_R = token_idx_A[b0:b1]
            x_RD = _gather_rows(x_TD, tok_R)
            h_RH = _seg_mm(
                x_RD, w_in_EHD, segs, transpose=True, out_RO=h_AH[b0:b1] if save else None
            )
            a_RF = _act_forward(h_RH, activation).mul_(w_A1[b0:b1])
            _scatter_add_rows(out_TD, tok_R, _seg_mm(a_RF, w_out_EDF, segs, transpose=True))
        if save:
            ctx.save_for_backward(x_TD, w_in_EHD, w_out_EDF, weight_A, token_idx_A, h_AH)
            ctx.chunks, ctx.counts, ctx.activation = chunks, counts, activation
        return out_TD

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_TD):
        x_TD, w_in_EHD, w_out_EDF, weight_A, token_idx_A, h_AH = ctx.saved_tensors
        need_x, need_win, need_wout, need_w = ctx.needs_input_grad[:4]
        w_A1 = weight_A.to(h_AH.dtype).unsqueeze(-1)
        grad_TD = grad_TD.contiguous()
        dx_TD = torch.zeros_like(x_TD) if need_x else None
        dw_in = _zero_unused(torch.empty_like(w_in_EHD), ctx.counts) if need_win else None
        dw_out = _zero_unused(torch.empty_like(w_out_EDF), ctx.counts) if need_wout else None
        dweight_A = h_AH.new_empty(h_AH.shape[0]) if need_w else None
        for b0, b1, segs in ctx.chunks:
            tok_R = token_idx_A[b0:b1]
            g_RD = _gather_rows(grad_TD, tok_R)
            h_RH = h_AH[b0:b1]
            act_RF, silu_RF = _act_recompute(h_RH, ctx.activation)  # recomputed, not saved
            if need_wout:
                _seg_weight_grad(dw_out, g_RD, act_RF * w_A1[b0:b1], segs)
            if not (need_x or need_win or need_w):
                continue
            u_RF = _seg_mm(g_RD, w_out_EDF, segs, transpose=False)
            if need_w:
                dweight_A[b0:b1] = (act_RF * u_RF).sum(dim=-1)
            if need_x or need_win:
                dh_RH = _act_backward(u_RF.mul_(w_A1[b0:b1]), h_RH, ctx.activation, silu_RF)
                if need_win:
                    _seg_weight_grad(dw_in, dh_RH, _gather_rows(x_TD, tok_R), segs)
                if need_x:
                    _scatter_add_rows(dx_TD, tok_R, _seg_mm(dh_RH, w_in_EHD, segs, transpose=False))
        if dweight_A is not None:
            dweight_A = dweight_A.to(weight_A.dtype)
        return dx_TD, dw_in, dw_out, dweight_A, None, None, None, None


def one_token_ffn(
    x_1D: torch.Tensor,
    w_in_EHD: torch.Tensor,
    w_out_EDF: torch.Tensor,
    expert_idx_K: list[int],
    weight_K: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    """``sum_k w_k * down_e(act(W_in[e] x))`` for one token: a GEMV pair per chosen expert."""
    out_1D = None
    for k, e in enumerate(expert_idx_K):
        a_1F = _act_forward(F.linear(x_1D, w_in_EHD[e]), activation).mul_(weight_K[k].to(x_1D.dtype))
        y_1D = F.linear(a_1F, w_out_EDF[e])
        out_1D = y_1D if out_1D is None else out_1D.add_(y_1D)
    return out_1D if out_1D is not None else torch.zeros_like(x_1D)


def grouped_ffn_no_grad(
    x_AD: torch.Tensor,
    w_in_EHD: torch.Tensor,
    w_out_EDF: torch.Tensor,
    weight_A: torch.Tensor,
    offsets_E: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    """Expert outputs of rows already sorted by expert, without autograd:
    ``y_A = (act(x_A W_in[e]^T) * w_A) W_out[e]^T`` for the rows ``offsets_E[e-1]:offsets_E[e]``
    of expert e. One ``torch._grouped_mm`` per projection where `_use_grouped_mm` allows
    (no host sync), else a ``torch.mm`` per expert (`_seg_mm`)."""
    segs: list[Segment] | None = None

    def mm(a_RI: torch.Tensor, w_EOI: torch.Tensor) -> torch.Tensor:
        nonlocal segs
        if _use_grouped_mm(a_RI, w_EOI.transpose(1, 2)):
            return torch._grouped_mm(a_RI, w_EOI.transpose(1, 2), offs=offsets_E)
        if segs is None:
            ends = offsets_E.tolist()
            segs = [(e, s, t) for e, (s, t) in enumerate(zip([0, *ends[:-1]], ends, strict=True)) if t > s]
        return _seg_mm(a_RI, w_EOI, segs, transpose=True)

    a_AF = _act_forward(mm(x_AD, w_in_EHD), activation).mul_(weight_A.to(x_AD.dtype).unsqueeze(-1))
    return mm(a_AF, w_out_EDF)


class RoutedExperts(nn.Module):
    """E expert FFNs with stacked weights; each runs only on the tokens routed to it."""

    def __init__(self, d_model: int, d_expert: int, num_experts: int, activation: str = "swiglu"):
        super().__init__()
        self.num_experts, self.d_model, self.d_expert = num_experts, d_model, d_expert
        self.activation = activation
        in_rows = 2 * d_expert if activation == "swiglu" else d_expert
        w_in = torch.empty(num_experts, in_rows, d_model)
        if activation == "swiglu":
            self.gate_up_proj = nn.Parameter(w_in)
        else:
            self.up_proj = nn.Parameter(w_in)
        self.down_proj = nn.Parameter(torch.empty(num_experts, d_model, d_expert))
        self.reset_parameters()

    @property
    def w_in(self) -> torch.Tensor:
        return self.gate_up_proj if self.activation == "swiglu" else self.up_proj

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        nn.init.normal_(self.w_in, std=std)
        nn.init.normal_(self.down_proj, std=std if out_std is None else out_std)

    def expert_ffn(self, x_ND: torch.Tensor, e: int) -> torch.Tensor:
        """Expert e applied to N tokens: down(act(x W_in^T))."""
        return F.linear(_activate(F.linear(x_ND, self.w_in[e]), self.activation), self.down_proj[e])

    def forward(self, x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """Fast path: tokens sorted by expert, one GEMM pair per expert slice, no mask scans.

        Sorting makes each expert's tokens a contiguous slice of the plan, so experts that
        received no token cost nothing and there is one host sync per layer. The whole
        expert FFN is one autograd node (`_ExpertFFN`) with a hand-written backward; see
        its docstring.
        """
        if plan.token_idx_A.numel() == 0:
            return torch.zeros_like(x_TD) + 0.0 * self.down_proj.sum()  # keep the graph connected
        counts = plan.counts_E.tolist()  # one host sync for the whole layer
        inputs = (x_TD, self.w_in, self.down_proj, plan.weight_A)
        save = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
        return _ExpertFFN.apply(*inputs, plan.token_idx_A, counts, self.activation, save)

    def forward_one_token(self, x_1D: torch.Tensor, expert_idx_K: list[int], weight_K: torch.Tensor) -> torch.Tensor:
        """Single-token decode (no autograd): one GEMV pair per chosen expert, nothing else.

        At T=1 the sorted-dispatch machinery (sort, counts, gather/scatter of one row)
        costs more than the four GEMVs it organises; this computes
        ``sum_k w_k * down_e(act(W_in[e] x))`` directly. Equal to `forward` (tested).
        """
        return one_token_ffn(x_1D, self.w_in, self.down_proj, expert_idx_K, weight_K, self.activation)

    def forward_reference(self, x_TD: torch.Tensor, assignments: Assignments) -> torch.Tensor:
        """Readable reference: for each expert, find its tokens with a mask and run it.

        No sorting, no offsets: ``out[t] += w * expert_e(x[t])`` for every assignment.
        """
        token_A, expert_A, weight_A = assignments
        out_TD = torch.zeros_like(x_TD)
        for e in range(self.num_experts):
            mine = expert_A == e
            if not bool(mine.any()):
                continue
            tokens = token_A[mine]
            y = self.expert_ffn(x_TD[tokens], e) * weight_A[mine].to(x_TD.dtype).unsqueeze(-1)
            out_TD = out_TD.index_add(0, tokens, y)
        return out_TD

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, d_model={self.d_model}, d_expert={self.d_expert}, activation={self.activation}"


class FeedForward(nn.Module):
    """Dense FFN: SwiGLU ``down(silu(gate(x)) * up(x))`` or GELU ``down(gelu(up(x)))``.

    Used for dense layers, the dense baseline and the (fused) shared experts. Names match
    HF Llama/Mixtral MLPs (``gate_proj``, ``up_proj``, ``down_proj``).
    """

    def __init__(self, d_model: int, d_hidden: int, activation: str = "swiglu"):
        super().__init__()
        self.activation = activation
        if activation == "swiglu":
            self.gate_proj = nn.Linear(d_model, d_hidden, bias=False)
        self.up_proj = nn.Linear(d_model, d_hidden, bias=False)
        self.down_proj = nn.Linear(d_hidden, d_model, bias=False)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        for lin in (getattr(self, "gate_proj", None), self.up_proj):
            if lin is not None:
                nn.init.normal_(lin.weight, std=std)
        nn.init.normal_(self.down_proj.weight, std=std if out_std is None else out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "swiglu":
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x)))
