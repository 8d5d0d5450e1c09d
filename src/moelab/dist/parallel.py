"""Applying expert parallelism to a model from outside, and the gradient rules.

* `shard_experts`: every MoE layer keeps experts ``[ep_rank * L, (ep_rank + 1) * L)`` of
  its stacked weights (same parameter names, first dim L = E / ep) and gets an
  `AllToAllDispatcher`. Everything else stays replicated.
* `reduce_gradients`: each rank's loss is its *share* of the global loss (normalised by
  the global token count), so the global gradient is a sum. Replicated parameters (the
  router included) are summed over every rank (dp x ep). Expert parameters already hold
  the sum over their ep group -- the backward of the token exchange brought every rank's
  contribution to them -- so they are summed over dp only (DeepSpeed-MoE's
  expert-data-parallel group). Summing them over ep as well is the "gradients ep times
  too large" bug (pytorch#160285, Megatron PR #5956).
* `clip_grad_norm`: the global norm, replicated parameters counted once and expert shards
  summed over the ep group.
* `full_state_dict` / `full_optimizer_state`: shards gathered along the expert dim, for a
  consolidated checkpoint any EP size (or one process) can load; `shard_state` slices back.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from moelab.dist.dispatcher import AllToAllDispatcher, register_for_compile
from moelab.dist.mesh import DistContext
from moelab.errors import ConfigError
from moelab.moe import MoE
from moelab.moe.experts import RoutedExperts


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def check_divisible(model: nn.Module, ep: int) -> None:
    for moe in moe_layers(model):
        E = moe.cfg.num_experts
        if E % ep:
            raise ConfigError(f"--ep {ep}: MoEConfig.num_experts={E} is not divisible by the EP size "
                              f"(choose an --ep that divides {E})")


def expert_param_names(model: nn.Module) -> set[str]:
    """Names of the routed experts' stacked parameters (sharded along dim 0)."""
    names = set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, RoutedExperts):
            names |= {f"{mod_name}.{n}" for n, _ in mod.named_parameters()}
    return names


def shard_experts(model: nn.Module, ctx: DistContext, *, global_batch: bool = True) -> nn.Module:
    """Keep this rank's experts and install the all-to-all dispatcher (in place).

    ``global_batch=False``: every rank's tokens are its own batch (replicated inference).
    """
    ep, r = ctx.ep_size, ctx.ep_rank
    check_divisible(model, ep)
    for moe in moe_layers(model):
        full = moe.experts
        if type(full) is not RoutedExperts:
            raise ConfigError(f"--ep needs the float routed experts; this layer holds {type(full).__name__} "
                              "(quantised or offloaded experts are not sharded)")
        L = full.num_experts // ep
        local = RoutedExperts(full.d_model, full.d_expert, L, full.activation, impl=full.impl, bias=full.has_bias,
                              swiglu_alpha=full.swiglu_alpha, swiglu_limit=full.swiglu_limit,
                              weight_on_input=full.weight_on_input)
        # Cast before copying: a float64 model's shards must not pass through float32
        # (found by the gpt-oss parity case, whose biases are not float32-representable).
        local = local.to(device=full.down_proj.device, dtype=full.down_proj.dtype)
        with torch.no_grad():
            for name, p in full.named_parameters():
                getattr(local, name).copy_(p[r * L:(r + 1) * L])
        moe.experts = local
        cfg = moe.cfg
        moe.dispatcher = AllToAllDispatcher(cfg.num_experts, cfg.top_k, cfg.capacity_factor, cfg.drop_policy,
                                            ep_group=ctx.ep_group,
                                            batch_group=ctx.world_group if global_batch else None,
                                            weight_on_input=full.weight_on_input)
        register_for_compile(moe.dispatcher, local)  # the compiled decode's op finds them by key
    return model


def _split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    experts = expert_param_names(model)
    rep, exp = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (exp if name in experts else rep).append(p)
    return rep, exp


def _sum_grads(params: list[nn.Parameter], group) -> None:
    """One flat all-reduce (SUM) of these gradients over `group`."""
    if not params:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, group=group)
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


@torch.no_grad()
def reduce_gradients(model: nn.Module, ctx: DistContext) -> None:
    """The gradient rules of the module docstring; call after ``backward`` on every rank.

    A replicated parameter without a gradient on every rank keeps ``grad=None`` (AdamW
    skips it, as one process would); one that has a gradient on any rank gets zeros where
    it has none, so every rank passes the same flat buffer. Expert shards always get a
    gradient (zeros on a rank whose experts saw no token), as the stacked tensor would in
    one process.
    """
    rep, exp = _split(model)
    has = torch.tensor([p.grad is not None for p in rep], dtype=torch.uint8)
    dist.all_reduce(has, op=dist.ReduceOp.MAX, group=ctx.world_group)
    rep = [p for p, h in zip(rep, has.tolist(), strict=True) if h]
    for p in rep + exp:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    _sum_grads(rep, ctx.world_group)
    if ctx.dp_size > 1:
        _sum_grads(exp, ctx.dp_group)


@torch.no_grad()
def clip_grad_norm(model: nn.Module, ctx: DistContext, max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` over the whole (sharded) model; returns the norm."""
    rep, exp = _split(model)
    sq = lambda ps: sum((p.grad.float().square().sum() for p in ps if p.grad is not None),  # noqa: E731
                        torch.zeros((), dtype=torch.float32))
    exp_sq = sq(exp)
    dist.all_reduce(exp_sq, group=ctx.ep_group)
    total = (sq(rep) + exp_sq).sqrt()
    if math.isfinite(max_norm):
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for p in rep + exp:
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.dtype))
    return total


def _gather_dim0(t: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


@torch.no_grad()
def full_state_dict(model: nn.Module, ctx: DistContext) -> dict[str, torch.Tensor]:
    """The unsharded model state (experts gathered over the ep group), on every rank."""
    experts = expert_param_names(model)
    return {k: (_gather_dim0(v, ctx.ep_group) if k in experts else v) for k, v in model.state_dict().items()}


@torch.no_grad()
def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, ctx: DistContext) -> dict:
    """`optimizer.state_dict()` with the expert parameters' moments gathered (index-keyed,
    in ``model.parameters()`` order, which sharding does not change)."""
    experts = expert_param_names(model)
    index_of = {id(p): i for i, p in enumerate(q for g in optimizer.param_groups for q in g["params"])}
    is_expert = {index_of[id(p)] for n, p in model.named_parameters() if n in experts and id(p) in index_of}
    sd = optimizer.state_dict()
    state = {}
    for i, s in sd["state"].items():
        state[i] = {k: (_gather_dim0(v, ctx.ep_group) if i in is_expert and torch.is_tensor(v) and v.dim() > 0
                        else v) for k, v in s.items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def shard_state(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    L = tensor.shape[0] // ctx.ep_size
    return tensor[ctx.ep_rank * L:(ctx.ep_rank + 1) * L].clone()
