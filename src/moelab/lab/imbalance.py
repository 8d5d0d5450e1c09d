"""What an imbalanced router costs a real system, measured on a trained model's routers.

Two costs, both from the per-expert loads of held-out tokens:

- **dropped tokens under a capacity factor** (GShard, Switch): each expert takes at most
  ``C = ceil(cf * T * K / E)`` of a batch's assignments and the overflow is dropped
  (`moelab.moe.routing.capacity_keep_mask`); a router that sends half its assignments
  to one expert loses most of them at cf = 1.25;
- **expert-parallel step time**: with the E experts split contiguously over ``ep``
  devices (as `moelab.dist.parallel.shard_experts` does), every MoE layer's all-to-all
  waits for the busiest device, so a step takes ``max device load / mean device load``
  times as long as a balanced one (`ep_step_factor`).

The maths are pure functions of loads (`device_loads`, `ep_step_factor`,
`effective_experts`); `measure_routing_costs` runs the routers on token batches to get them.

Legend: T tokens, D model dim, E experts, K experts per token, L MoE layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from moelab.errors import ConfigError
from moelab.model import Transformer
from moelab.moe import routing


def device_loads(load_E: Sequence[float], ep: int) -> np.ndarray:
    """Assignments per device when E experts are split contiguously over `ep` devices
    (device d holds experts ``d*E/ep .. (d+1)*E/ep - 1``, as `shard_experts` does)."""
    load = np.asarray(load_E, dtype=np.float64)
    E = load.shape[-1]
    if not isinstance(ep, int) or ep <= 0 or E % ep:
        raise ConfigError(f"expert-parallel size {ep!r} must be a positive divisor of num_experts={E}")
    return load.reshape(*load.shape[:-1], ep, E // ep).sum(axis=-1)


def ep_step_factor(loads_NE: Sequence[Sequence[float]] | np.ndarray, ep: int) -> float:
    """How many times longer an expert-parallel step takes than with balanced loads.

    `loads_NE`: assignments per expert of every (batch, MoE layer) call, any leading
    shape. Each call ends in an all-to-all that every device must reach, so it takes as
    long as its busiest device: the calls cost ``sum_n max_d load_nd`` expert rows against
    ``sum_n mean_d load_nd`` balanced. (Expert compute only: attention and the exchange
    itself are not in the factor, so a real step's slowdown is smaller by their share of
    the step.) 1.0 = balanced; ``ep`` = everything on one device. A call with no load
    contributes nothing; no load at all gives 1.0.
    """
    dev_ND = device_loads(np.atleast_2d(np.asarray(loads_NE, dtype=np.float64)), ep)
    mean = dev_ND.mean(axis=-1).sum()
    return float(dev_ND.max(axis=-1).sum() / mean) if mean > 0 else 1.0


def effective_experts(load_E: Sequence[float]) -> float:
    """``exp(entropy)`` of the load shares: the number of equally used experts with the
    same spread (E when balanced, 2 when two experts share all the load equally). It is
    what sizes the dense model a collapsed MoE resembles: a top-K router that uses
    about K experts is a dense FFN of width K*F."""
    load = np.asarray(load_E, dtype=np.float64)
    total = load.sum()
    if total <= 0:
        return 0.0
    p = load[load > 0] / total
    return float(math.exp(-(p * np.log(p)).sum()))


@dataclass(frozen=True)
class RoutingCosts:
    """A trained model's routers on held-out batches (`measure_routing_costs`)."""

    capacity_factor: float
    dropped_fraction: float  # of all (token, layer, choice) assignments, at `capacity_factor`
    ep_step_factor: dict[str, float]  # EP size (as a JSON key) -> `ep_step_factor` over the (batch, layer) calls
    effective_experts: float  # mean over layers
    load_LE: list[list[float]]  # assignments per expert, per MoE layer, summed over the batches


@torch.no_grad()
def moe_inputs(model: Transformer, batches: Sequence[torch.Tensor], layers: Sequence[torch.nn.Module]) -> list[list[torch.Tensor]]:
    """Each of `layers`' input ``[..., D]`` on an eval-mode forward of every batch of token
    ids ``[B, T]`` (no router noise or jitter: the routers as they would serve)."""
    inputs: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [m.register_forward_pre_hook(lambda _m, args, i=i: inputs[i].append(args[0].detach()))
             for i, m in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        for ids in batches:
            model(ids.to(model.embed_tokens.weight.device), return_logits=False, telemetry=False)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return inputs


@torch.no_grad()
def measure_routing_costs(model: Transformer, batches: Sequence[torch.Tensor], *, capacity_factor: float,
                          ep_sizes: Sequence[int]) -> RoutingCosts | None:
    """Route every batch of token ids ``[B, T]`` through each token-choice MoE layer's
    router (its own logits and selection: bias and groups included) and measure the
    `RoutingCosts`. Capacity is per batch (``T = B * seq`` tokens, as in a training step)
    and applied per layer to the dropless model's hidden states, so a layer's drops do not
    change the next layer's input: each router's own drop rate. ``None``: no such layer.
    """
    layers = [m for m in model.moe_layers if m.cfg.router != "expert_choice"]
    if not layers:
        return None
    E = layers[0].cfg.num_experts
    loads, calls, dropped, assigned = [], [], 0, 0
    for moe, xs in zip(layers, moe_inputs(model, batches, layers), strict=True):
        load_E = torch.zeros(E, dtype=torch.float64)
        for x in xs:
            x_TD = x.reshape(-1, x.shape[-1]).float()
            route = moe.router.select(moe.router.logits(x_TD))
            T, K = route.expert_idx_TK.shape
            keep_TK = routing.capacity_keep_mask(route.expert_idx_TK, route.weights_TK, E,
                                                 routing.expert_capacity(T, E, K, capacity_factor),
                                                 moe.cfg.drop_policy)
            dropped += int((~keep_TK).sum())
            assigned += T * K
            call_E = torch.bincount(route.expert_idx_TK.reshape(-1), minlength=E).double()
            calls.append(call_E.tolist())
            load_E += call_E
        loads.append(load_E.tolist())
    return RoutingCosts(
        capacity_factor=capacity_factor,
        dropped_fraction=dropped / assigned if assigned else 0.0,
        # Per (batch, layer) call: a step waits for each call's busiest device.
        ep_step_factor={str(ep): ep_step_factor(calls, ep) for ep in ep_sizes if E % ep == 0},
        effective_experts=float(np.mean([effective_experts(le) for le in loads])),
        load_LE=loads,
    )
