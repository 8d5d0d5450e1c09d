"""Expert FFNs: the stacked routed experts, their backends, and the dense FFN.

Legend: A rows (kept assignments, grouped by expert), T tokens, D model dim, F expert
hidden dim, E experts, H = 2F (swiglu) or F (gelu) rows of the input projection.

Routed expert weights are stacked, one tensor per projection, in the in-memory layout of
current HF transformers so checkpoint mapping is a rename:
  swiglu: ``gate_up_proj [E, 2F, D]`` (gate rows first, then up), ``down_proj [E, D, F]``
  gelu:   ``up_proj [E, F, D]``, ``down_proj [E, D, F]``

An **experts backend** computes ``y_A = (act(x_A W_in[e]^T) * w_A) W_out[e]^T`` for rows
grouped by expert (the dispatcher's output): ``forward(experts, x_AD,
tokens_per_expert_E, weight_A) -> y_AD``. `RoutedExperts` picks one per call from a small
table, by device and weight dtype (`select_backend`); ``MoEConfig.impl="loop"`` forces
the readable reference. A new backend (quantised or offloaded experts, a new kernel) is
one `register_backend` call; `cpu_bf16` below is the worked example.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moelab import hardware
from moelab.moe import cpu_kernels, ops, traced

log = logging.getLogger(__name__)


def activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    """The activation under autograd: ``silu(gate) * up`` (swiglu) or ``gelu(h)``."""
    return cpu_kernels.act_forward(h, activation, inplace=False)


def swiglu_oai(h_NH: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's clamped GLU on ``h = [gate | up]``: ``(clamp(up, -l, l) + 1) * g sigmoid(alpha g)``
    with ``g = min(gate, l)``. The clamp bounds activations for low-precision (MXFP4) experts;
    the ``+ 1`` keeps a unit path through ``up``."""
    gate, up = h_NH.chunk(2, dim=-1)
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


# ---------------------------------------------------------------------------- backends

BackendForward = Callable[["RoutedExperts", torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ExpertsBackend:
    """One way to run the routed experts.

    ``forward(experts, x_AD, tokens_per_expert_E, weight_A) -> y_AD``; ``applies(experts,
    x_AD)`` says whether it serves this call (device, dtypes, what the build has).
    """

    name: str
    forward: BackendForward
    applies: Callable[[RoutedExperts, torch.Tensor], bool]
    summary: str
    # Optional: ``(experts, x_TD, token_idx_A, tokens_per_expert_E, weight_A) -> y_TD``, the
    # gather and the combine fused in (the local dispatcher uses it when present).
    forward_gathered: Callable[..., torch.Tensor] | None = None


# Auto-selection order: the first backend that applies wins. `register_backend` puts a
# new backend in front of the ones registered before it, so the catch-all
# (`segmented`) is registered first and specific ones after.
_AUTO: list[ExpertsBackend] = []
BACKENDS: dict[str, ExpertsBackend] = {}


def register_backend(backend: ExpertsBackend, *, auto: bool = True) -> ExpertsBackend:
    """Add `backend` to the table (``auto=False``: only chosen by name)."""
    if backend.name in BACKENDS:
        raise ValueError(f"experts backend {backend.name!r} is already registered")
    BACKENDS[backend.name] = backend
    if auto:
        _AUTO.insert(0, backend)
    return backend


def select_backend(experts: RoutedExperts, x_AD: torch.Tensor, impl: str = "grouped") -> ExpertsBackend:
    """The backend for this call: ``impl="loop"`` the reference, else the first that applies.

    Experts with biases or the clamped gpt-oss GLU always take the reference: the fast
    kernels compute ``act(x W_in^T) W_out^T`` only."""
    if impl == "loop" or experts.reference_only:
        return BACKENDS["loop"]
    for backend in _AUTO:
        if backend.applies(experts, x_AD):
            return backend
    raise AssertionError("the segmented backend applies to every call")  # pragma: no cover


def _loop_forward(experts: RoutedExperts, x_AD: torch.Tensor, counts_E: torch.Tensor, weight_A: torch.Tensor):
    """Readable reference: each expert's slice of rows through `RoutedExperts.expert_ffn`.
    (In a compiled inference graph, a few rows run `_traced_reference` instead: the loop's
    ``counts.tolist()`` cannot be traced.)"""
    if torch.compiler.is_compiling() and not torch.is_grad_enabled() and x_AD.shape[0] <= traced.TRACED_MAX_ROWS:
        return _traced_reference(experts, x_AD, counts_E, weight_A)
    parts, start = [], 0
    for e, n in enumerate(counts_E.tolist()):
        if n:
            rows = slice(start, start + n)
            w = weight_A[rows].to(x_AD.dtype).unsqueeze(-1)
            if experts.weight_on_input:  # Llama 4: expert_e(w x)
                parts.append(experts.expert_ffn(x_AD[rows] * w, e))
            else:
                parts.append(experts.expert_ffn(x_AD[rows], e) * w)
            start += n
    if not parts:
        return _empty_output(experts, x_AD)
    return torch.cat(parts)


def _traced_reference(experts: RoutedExperts, x_AD: torch.Tensor, counts_E: torch.Tensor,
                      weight_A: torch.Tensor) -> torch.Tensor:
    """`_loop_forward`'s ``expert_ffn`` per row with the row's own expert's weights and
    biases (`moelab.moe.traced`): what the experts the fast kernels do not take (biases,
    gpt-oss's clamped GLU, Llama 4's weight on the input) run as in a compiled decode step."""
    e_A = traced.expert_of_rows(counts_E, x_AD.shape[0])
    w_A1 = weight_A.to(x_AD.dtype).unsqueeze(-1)
    x_in = x_AD * w_A1 if experts.weight_on_input else x_AD
    h_AH = traced.rows_matvec(x_in, experts.w_in[e_A])
    if experts.has_bias:
        h_AH = h_AH + experts.b_in[e_A].to(h_AH.dtype)
    if experts.activation == "swiglu_oai":
        a_AF = swiglu_oai(h_AH, experts.swiglu_alpha, experts.swiglu_limit)
    else:
        a_AF = activate(h_AH, experts.activation)
    y_AD = traced.rows_matvec(a_AF, experts.down_proj[e_A])
    if experts.has_bias:
        y_AD = y_AD + experts.down_proj_bias[e_A].to(y_AD.dtype)
    y_AD = y_AD.to(x_AD.dtype)
    return y_AD if experts.weight_on_input else y_AD * w_A1


def _empty_output(experts: RoutedExperts, x_AD: torch.Tensor) -> torch.Tensor:
    # Nothing routed (every assignment dropped): zeros, with the graph kept connected.
    return x_AD.new_zeros(0, experts.d_model) + 0.0 * experts.down_proj.sum()


def _autocast_dtype(experts: RoutedExperts, x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast runs matmuls in here, when it differs from the experts' weights.

    The segmented kernel's GEMMs (``torch.mm(out=...)``, ``torch._grouped_mm``) are not
    cast by autocast themselves, so without this the experts stayed fp32 under
    ``precision="bf16"`` while every other matmul ran bf16: tiny-moe took 1.52x
    tiny-dense's step time under autocast against 1.20x in fp32 (measured, `moelab demo`).
    """
    device = x.device.type
    if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
        return None
    dtype = torch.get_autocast_dtype(device)
    return dtype if dtype != experts.w_in.dtype else None


def _segmented(experts: RoutedExperts, x: torch.Tensor, counts_E: torch.Tensor, weight_A: torch.Tensor,
               token_idx_A: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``x_AD`` (or tokens ``x_TD`` with ``token_idx_A``: the fused local path);
    under autocast the weights and rows are cast to its dtype (autograd carries the
    gradients back to the parameters) and the output back to the input's dtype."""
    w_in, w_out = experts.w_in, experts.down_proj
    cast = _autocast_dtype(experts, x)
    if cast is not None:
        w_in, w_out = w_in.to(cast), w_out.to(cast)
        return _segmented_call(x.to(cast), w_in, w_out, weight_A, counts_E, experts.activation, token_idx_A).to(x.dtype)
    return _segmented_call(x, w_in, w_out, weight_A, counts_E, experts.activation, token_idx_A)


def _segmented_call(x, w_in, w_out, weight_A, counts_E, activation, token_idx_A):
    """Eager: the kernel itself. Compiled: an opaque op, so the graph does not specialise
    on the routing (`moelab.moe.ops`); with gradients when the graph trains."""
    if token_idx_A is None and torch.compiler.is_compiling():
        if not torch.is_grad_enabled():
            if x.device.type == "cpu" and x.shape[0] <= traced.TRACED_MAX_ROWS:
                # A decode step's few rows: traced, each row reading its own expert's
                # weights in a fused reduction (`moelab.moe.traced`).
                return traced.expert_rows(x, counts_E, weight_A, w_in, w_out, activation)
            return ops.segmented_expert_ffn(x, w_in, w_out, weight_A, counts_E, activation)
        if x.device.type == "cpu":
            return ops.segmented_expert_ffn_train(x, w_in, w_out, weight_A, counts_E, activation)
    return cpu_kernels.segmented_ffn(x, w_in, w_out, weight_A, counts_E, activation, token_idx_A)


def _segmented_forward(experts: RoutedExperts, x_AD: torch.Tensor, counts_E: torch.Tensor, weight_A: torch.Tensor):
    if x_AD.shape[0] == 0:
        return _empty_output(experts, x_AD)
    return _segmented(experts, x_AD, counts_E, weight_A)


register_backend(ExpertsBackend(
    "loop", _loop_forward, lambda experts, x_AD: True,
    "the readable reference: one F.linear pair per expert slice, autograd by torch",
), auto=False)
def _segmented_gathered(experts: RoutedExperts, x_TD: torch.Tensor, token_idx_A: torch.Tensor,
                        counts_E: torch.Tensor, weight_A: torch.Tensor) -> torch.Tensor:
    if token_idx_A.numel() == 0:
        return torch.zeros_like(x_TD) + 0.0 * experts.down_proj.sum()  # keep the graph connected
    return _segmented(experts, x_TD, counts_E, weight_A, token_idx_A)


register_backend(ExpertsBackend(
    "segmented", _segmented_forward, lambda experts, x_AD: True,
    "per-expert GEMMs over row segments in cache-sized chunks, hand-written backward, "
    "torch._grouped_mm for small chunks on CPU (any device, any float dtype)",
    forward_gathered=_segmented_gathered,
))


# The worked example of a backend: bf16 expert weights on a CPU with native bf16
# (AMX-BF16 or AVX512-BF16), e.g. experts cast to bf16 in an fp32 model to halve their
# memory. The rows are cast to bf16 for the GEMMs (the weights' dtype: the kernels take
# one dtype) and the output back to the rows' dtype. Without native bf16 a bf16 GEMM is
# emulated (~400x slower than fp32 on one machine we had), so there the weights are
# upcast to float32 for the call instead, said once in the log.
def _cpu_bf16(experts: RoutedExperts, x: torch.Tensor, counts_E: torch.Tensor, weight_A: torch.Tensor,
              token_idx_A: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``x_AD`` (or, with ``token_idx_A``, tokens ``x_TD``: the fused local path)."""
    if token_idx_A is not None and token_idx_A.numel() == 0:
        return torch.zeros_like(x) + 0.0 * experts.down_proj.sum()
    if native_bf16():
        return _segmented(experts, x.to(torch.bfloat16), counts_E, weight_A, token_idx_A).to(x.dtype)
    if not _warned_emulated_bf16:
        _warned_emulated_bf16.append(True)
        log.warning("this CPU has no native bf16 (no amx_bf16/avx512_bf16 flag): bf16 expert weights "
                    "are upcast to float32 for every call (slower than storing them in float32)")
    # `_segmented_call`, not the kernel: a compiled graph takes the op or the traced rows
    # (the kernel's host sync on the routing cannot be traced)
    y = _segmented_call(x.float(), experts.w_in.float(), experts.down_proj.float(), weight_A, counts_E,
                        experts.activation, token_idx_A)
    return y.to(x.dtype)


def _cpu_bf16_forward(experts: RoutedExperts, x_AD: torch.Tensor, counts_E: torch.Tensor, weight_A: torch.Tensor):
    if x_AD.shape[0] == 0:
        return _empty_output(experts, x_AD)
    return _cpu_bf16(experts, x_AD, counts_E, weight_A)


def _cpu_bf16_gathered(experts: RoutedExperts, x_TD: torch.Tensor, token_idx_A: torch.Tensor,
                       counts_E: torch.Tensor, weight_A: torch.Tensor) -> torch.Tensor:
    return _cpu_bf16(experts, x_TD, counts_E, weight_A, token_idx_A)


_warned_emulated_bf16: list[bool] = []


@torch.compiler.assume_constant_result
def native_bf16() -> bool:
    """`hardware.cpu_native_bf16`, which a compiled graph takes as a constant (it reads
    /proc/cpuinfo, which dynamo cannot trace: a bf16 model's ``generate(compile=True)``
    failed on it). `moelab.quant.experts.dense_dtype` asks it too."""
    return hardware.cpu_native_bf16()

register_backend(ExpertsBackend(
    "cpu_bf16", _cpu_bf16_forward,
    lambda experts, x_AD: x_AD.device.type == "cpu" and experts.w_in.dtype == torch.bfloat16,
    "bf16 expert weights on CPU: bf16 GEMMs where the CPU has native bf16, else float32",
    forward_gathered=_cpu_bf16_gathered,
))


def _cuda_grouped_forward(experts: RoutedExperts, x_AD: torch.Tensor, counts_E: torch.Tensor, weight_A: torch.Tensor):
    """Two ``torch._grouped_mm`` calls over all experts: no host sync, autograd by torch."""
    offsets_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
    h_AH = torch._grouped_mm(x_AD.to(experts.w_in.dtype), experts.w_in.transpose(1, 2), offs=offsets_E)
    a_AF = activate(h_AH, experts.activation) * weight_A.to(h_AH.dtype).unsqueeze(-1)
    return torch._grouped_mm(a_AF, experts.down_proj.transpose(1, 2), offs=offsets_E).to(x_AD.dtype)


def _cuda_grouped_applies(experts: RoutedExperts, x_AD: torch.Tensor) -> bool:
    # torch's CUDA grouped GEMM takes bf16 with 16-byte aligned rows (sm90+ in torch 2.8;
    # newer builds also run it on sm80). Anything else falls back to `segmented`.
    w = experts.w_in
    return (x_AD.device.type == "cuda" and w.dtype == torch.bfloat16 and cpu_kernels.GROUPED_MM
            and experts.d_model % 8 == 0 and experts.d_expert % 8 == 0 and _cuda_grouped_mm_runs(x_AD.device))


_CUDA_PROBE: dict[int, bool] = {}


def _cuda_grouped_mm_runs(device: torch.device) -> bool:
    """One tiny bf16 grouped GEMM per device, once: some builds/GPUs lack the kernel."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CUDA_PROBE:
        try:
            a = torch.zeros(16, 16, dtype=torch.bfloat16, device=device)
            w = torch.zeros(2, 16, 16, dtype=torch.bfloat16, device=device)
            torch._grouped_mm(a, w, offs=torch.tensor([8, 16], dtype=torch.int32, device=device))
            _CUDA_PROBE[index] = True
        except (RuntimeError, NotImplementedError) as e:
            log.info("torch._grouped_mm does not run on %s (%s): experts use the segmented backend", device, e)
            _CUDA_PROBE[index] = False
    return _CUDA_PROBE[index]


register_backend(ExpertsBackend(
    "cuda_grouped_mm", _cuda_grouped_forward, _cuda_grouped_applies,
    "bf16 experts on CUDA: torch._grouped_mm over all experts, no host sync",
))


# ---------------------------------------------------------------------------- modules


class RoutedExperts(nn.Module):
    """E expert FFNs with stacked weights; each runs only on the rows routed to it."""

    def __init__(self, d_model: int, d_expert: int, num_experts: int, activation: str = "swiglu",
                 impl: str = "grouped", *, bias: bool = False, swiglu_alpha: float = 1.702,
                 swiglu_limit: float = 7.0, weight_on_input: bool = False):
        super().__init__()
        self.num_experts, self.d_model, self.d_expert = num_experts, d_model, d_expert
        self.activation, self.impl = activation, impl
        self.swiglu_alpha, self.swiglu_limit = swiglu_alpha, swiglu_limit
        gated = activation in ("swiglu", "swiglu_oai")
        in_rows = 2 * d_expert if gated else d_expert
        w_in = torch.empty(num_experts, in_rows, d_model)
        if gated:
            self.gate_up_proj = nn.Parameter(w_in)
        else:
            self.up_proj = nn.Parameter(w_in)
        self.down_proj = nn.Parameter(torch.empty(num_experts, d_model, d_expert))
        if bias:  # gpt-oss: ``gate_up_proj_bias [E, 2F]`` ([gate | up]), ``down_proj_bias [E, D]``
            self.register_parameter(f"{'gate_up_proj' if gated else 'up_proj'}_bias",
                                    nn.Parameter(torch.zeros(num_experts, in_rows)))
            self.down_proj_bias = nn.Parameter(torch.zeros(num_experts, d_model))
        self.has_bias, self.weight_on_input = bias, weight_on_input
        # Only the per-expert reference computes biases, the clamped GLU and input weighting.
        self.reference_only = bias or activation == "swiglu_oai" or weight_on_input
        self.reset_parameters()

    @property
    def w_in(self) -> torch.Tensor:
        return self.gate_up_proj if self.activation in ("swiglu", "swiglu_oai") else self.up_proj

    @property
    def b_in(self) -> torch.Tensor | None:
        if not self.has_bias:
            return None
        return self.gate_up_proj_bias if self.activation in ("swiglu", "swiglu_oai") else self.up_proj_bias

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        nn.init.normal_(self.w_in, std=std)
        nn.init.normal_(self.down_proj, std=std if out_std is None else out_std)
        if self.has_bias:
            nn.init.zeros_(self.b_in)
            nn.init.zeros_(self.down_proj_bias)

    def expert_ffn(self, x_ND: torch.Tensor, e: int) -> torch.Tensor:
        """Expert e applied to N rows: down(act(x W_in^T + b_in)) + b_out (biases: gpt-oss)."""
        b_in = self.b_in[e] if self.has_bias else None
        h = F.linear(x_ND, self.w_in[e], b_in)
        if self.activation == "swiglu_oai":
            a = swiglu_oai(h, self.swiglu_alpha, self.swiglu_limit)
        else:
            a = activate(h, self.activation)
        return F.linear(a, self.down_proj[e], self.down_proj_bias[e] if self.has_bias else None)

    def backend(self, x_AD: torch.Tensor) -> ExpertsBackend:
        """The backend a call with these rows takes."""
        return select_backend(self, x_AD, self.impl)

    def forward(self, x_AD: torch.Tensor, tokens_per_expert_E: torch.Tensor, weight_A: torch.Tensor) -> torch.Tensor:
        """``y_A = w_A * expert_e(x_A)`` for rows grouped by expert (see the module docstring)."""
        return self.backend(x_AD).forward(self, x_AD, tokens_per_expert_E, weight_A)

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
