"""Expert FFNs: the stacked routed experts and the dense FFN (shared experts, dense layers).

Legend: T tokens, D model dim, F expert hidden dim, E experts, A kept assignments.

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
        """Fast path: gather once in expert order, one GEMM pair per expert slice, scatter once.

        Sorting makes each expert's tokens a contiguous slice, so there is one gather and
        one index_add for the whole layer (rather than a mask scan, gather and scatter per
        expert), and experts that received no token cost nothing.
        """
        out_TD = torch.zeros_like(x_TD)
        if plan.token_idx_A.numel() == 0:
            return out_TD + 0.0 * self.down_proj.sum()  # keep the graph connected
        x_AD = x_TD.index_select(0, plan.token_idx_A)
        y_AD = self._grouped_ffn(x_AD, plan.counts_E)
        y_AD = y_AD * plan.weight_A.to(y_AD.dtype).unsqueeze(-1)
        return out_TD.index_add_(0, plan.token_idx_A, y_AD)

    def _grouped_ffn(self, x_AD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        counts = counts_E.tolist()  # one host sync for the whole layer
        outs = []
        start = 0
        for e, n in enumerate(counts):
            if n:
                outs.append(self.expert_ffn(x_AD[start : start + n], e))
                start += n
        return torch.cat(outs) if len(outs) > 1 else outs[0]

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

