"""`ExpertParallel`: the trainer's `Parallel` hooks for a ``dp x ep`` run.

The trainer's loop is unchanged; this object says what each rank does differently:

* ``prepare``: shard the experts (`shard_experts`); the rest stays replicated.
* ``shard_batch``: rank r takes rows ``[r*b, (r+1)*b)`` of the global batch (``b = B /
  world``), so the run sees exactly the one-process batches (`TokenBatcher` is a pure
  function of seed and step).
* ``loss_share``: the LM loss times ``n_local / n_global`` (valid targets) plus the MoE
  losses, which the dispatcher already returns as shares: the loss is normalised by the
  global token count.
* ``finish_backward``: `reduce_gradients` (replicated over dp x ep, experts over dp) and
  the global-norm clip.
* checkpoints are **consolidated**: the expert shards and their AdamW moments are
  gathered and the main rank writes an ordinary one-process checkpoint
  (`moelab.train.checkpoint`), so a run resumes at any EP size, or in one process with
  plain ``moelab train --resume``; loading reads that checkpoint on every rank and keeps
  each rank's slice.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from moelab.dist.mesh import DistContext
from moelab.dist.parallel import (
    clip_grad_norm,
    expert_param_names,
    full_optimizer_state,
    full_state_dict,
    reduce_gradients,
    shard_experts,
    shard_state,
)
from moelab.errors import ConfigError
from moelab.model import Transformer
from moelab.train import checkpoint as ckpt
from moelab.train.trainer import TrainConfig, build_optimizer


class ExpertParallel:
    def __init__(self, ctx: DistContext, train_cfg: TrainConfig):
        if train_cfg.batch_size % ctx.world_size:
            raise ConfigError(f"--batch-size {train_cfg.batch_size} is not divisible by the world size "
                              f"{ctx.world_size}: every rank takes an equal share of each batch")
        if train_cfg.compile:
            raise ConfigError("--compile does not combine with --ep yet: the all-to-all runs eagerly")
        self.ctx, self.train_cfg = ctx, train_cfg
        self.is_main, self.world_size = ctx.is_main, ctx.world_size

    def prepare(self, model: Transformer) -> None:
        shard_experts(model, self.ctx)

    def shard_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = x.shape[0] // self.world_size
        if b * self.world_size != x.shape[0]:
            raise ConfigError(f"a batch of {x.shape[0]} rows cannot be split over {self.world_size} ranks")
        rows = slice(self.ctx.rank * b, (self.ctx.rank + 1) * b)
        return x[rows], y[rows]

    def loss_share(self, out, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n_local = (y != -100).sum().to(torch.float64)
        n_global = n_local.clone()
        dist.all_reduce(n_global, group=self.ctx.world_group)
        lm_share = out.lm_loss * (n_local / n_global.clamp_min(1)).to(out.lm_loss.dtype)
        return lm_share + out.moe_loss, lm_share

    def finish_backward(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        reduce_gradients(model, self.ctx)
        return clip_grad_norm(model, self.ctx, max_norm)

    def all_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, group=self.ctx.world_group)
        return t.tolist()

    # ------------------------------------------------------------------ checkpoints

    def _full_copies(self, model: Transformer) -> tuple[Transformer, torch.optim.Optimizer]:
        full = Transformer(model.cfg)
        return full, build_optimizer(full, self.train_cfg)

    def save_checkpoint(self, run_dir: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
                        state: dict) -> None:
        """Gather on every rank (collectives), write once on the main rank, then a barrier
        so no rank runs ahead of a checkpoint still being written."""
        weights = full_state_dict(model, self.ctx)
        opt_state = full_optimizer_state(model, optimizer, self.ctx)
        if self.is_main:
            full, full_opt = self._full_copies(model)
            full.load_state_dict(weights)
            full_opt.load_state_dict(opt_state)
            ckpt.save_checkpoint(run_dir, model=full, optimizer=full_opt, step=step,
                                 state={**state, "saved_at_ep": self.ctx.ep_size, "saved_world": self.world_size})
        dist.barrier(group=self.ctx.world_group)

    def load_checkpoint(self, run_dir: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """Every rank reads the consolidated checkpoint (and its RNG states) and keeps its slice."""
        full, full_opt = self._full_copies(model)
        state = ckpt.load_checkpoint(run_dir, model=full, optimizer=full_opt)
        experts = expert_param_names(model)
        with torch.no_grad():
            full_params = dict(full.named_parameters())
            for name, p in model.named_parameters():
                src = full_params[name]
                p.copy_(shard_state(src, self.ctx) if name in experts else src)
            full_buffers = dict(full.named_buffers())
            for name, b in model.named_buffers():
                b.copy_(full_buffers[name])
        # Optimizer state is indexed by position in the param groups, which `build_optimizer`
        # fills in `model.parameters()` order, the same in the full and the sharded model.
        expert_ids = {id(p) for n, p in model.named_parameters() if n in experts}
        flat = [p for g in optimizer.param_groups for p in g["params"]]
        sd = full_opt.state_dict()
        state_sharded = {}
        for i, s in sd["state"].items():
            expert = id(flat[i]) in expert_ids
            state_sharded[i] = {k: (shard_state(v, self.ctx) if expert and torch.is_tensor(v) and v.dim() > 0 else v)
                                for k, v in s.items()}
        optimizer.load_state_dict({"state": state_sharded, "param_groups": sd["param_groups"]})
        dist.barrier(group=self.ctx.world_group)
        return state
