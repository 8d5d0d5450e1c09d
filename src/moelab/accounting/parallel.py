"""What expert parallelism costs, before anyone launches it (``moelab size --ep N``).

Units: bytes. Conventions, derived for one MoE layer with E routed experts, top-k K,
model dim D, activations of ``b`` bytes (bf16: 2), spread over ``ep`` ranks:

* **All-to-all bytes per token.** The dispatch sends each (token, expert) row, D values,
  to the rank holding the expert, and the combine sends the expert's output row back:
  ``2 K D b`` bytes per token per layer pass through the all-to-all (dispatch + combine).
  This is what `moelab.dist.AllToAllDispatcher` hands to ``all_to_all_single`` (rows
  addressed to the sender's own experts included: gloo and NCCL copy them locally), and
  what benchmarks/expert_parallel.py measures. With balanced routing a row stays on its
  rank with probability 1/ep, so ``(ep - 1) / ep`` of it crosses to another rank; over
  ``nodes`` nodes (ep ranks spread evenly) ``(nodes - 1) / nodes`` of it crosses between
  nodes. Training moves it again backwards (the gradients of both exchanges): 2x per
  token. Dropless; a capacity factor can only lower it. Routing metadata (E counts per
  rank per layer) is ignored: it is per batch, not per token.
* **Memory per rank.** Each rank holds E/ep of every MoE layer's routed experts and a
  full copy of everything else (attention, embeddings, router, shared experts).
"""

from __future__ import annotations

from typing import Any

from moelab.accounting.memory import WEIGHT_DTYPES, bytes_per_param
from moelab.accounting.params import ParamCount
from moelab.accounting.spec import ArchSpec, Spec
from moelab.errors import ConfigError


def all_to_all_bytes_per_token(top_k: int, d_model: int, activation_bytes: float = 2.0) -> float:
    """Dispatch + combine bytes through the all-to-all per token per MoE layer: 2 K D b."""
    return 2 * top_k * d_model * activation_bytes


def expert_parallel_report(spec: Spec, counts: ParamCount, *, ep: int, nodes: int = 1,
                           activation_dtype: str = "bf16") -> dict[str, Any]:
    """The ``expert_parallel`` block of `moelab size`: traffic per token and memory per rank."""
    if not isinstance(ep, int) or ep < 1:
        raise ConfigError(f"--ep must be an integer >= 1, got {ep!r}")
    if not isinstance(nodes, int) or nodes < 1 or ep % nodes:
        raise ConfigError(f"--nodes must be an integer >= 1 that divides --ep {ep}, got {nodes!r}")
    if not isinstance(spec, ArchSpec):
        raise ConfigError(f"--ep needs the model's architecture (d_model per layer); {spec.name} is a "
                          "published-totals preset without it")
    if not counts.moe_groups:
        raise ConfigError(f"--ep: {spec.name} has no MoE layer to spread")
    b = bytes_per_param(activation_dtype)
    layers, per_token = [], 0.0
    for g in counts.moe_groups:
        if g.num_experts % ep:
            raise ConfigError(f"--ep {ep}: layers {list(g.layers)} have {g.num_experts} experts, which "
                              f"{ep} ranks cannot split evenly (choose an --ep that divides {g.num_experts})")
        a2a = all_to_all_bytes_per_token(g.top_k, spec.d_model, b)
        per_token += a2a * len(g.layers)
        layers.append({
            "layers": list(g.layers),
            "experts_per_rank": g.num_experts // ep,
            "all_to_all_bytes_per_token": a2a,
            "cross_rank_bytes_per_token": a2a * (ep - 1) / ep,
            "cross_node_bytes_per_token": a2a * (nodes - 1) / nodes,
        })
    expert_params_per_rank = counts.routed_experts // ep
    replicated = counts.total - counts.routed_experts
    return {
        "ep": ep,
        "nodes": nodes,
        "activation_dtype": activation_dtype,
        "moe_layers": layers,
        "all_to_all_bytes_per_token": per_token,  # summed over every MoE layer, one forward
        "training_all_to_all_bytes_per_token": 2 * per_token,  # forward + backward
        "expert_params_per_rank": expert_params_per_rank,
        "replicated_params_per_rank": replicated,
        "expert_bytes_per_rank": {d: expert_params_per_rank * bytes_per_param(d) for d in WEIGHT_DTYPES},
        "bytes_per_rank": {d: (expert_params_per_rank + replicated) * bytes_per_param(d) for d in WEIGHT_DTYPES},
        # share of one device's weights each rank no longer holds
        "weights_saved_per_rank": 1 - (expert_params_per_rank + replicated) / counts.total,
    }
