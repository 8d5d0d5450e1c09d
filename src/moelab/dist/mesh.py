"""The process group and the ``dp x ep`` device mesh.

`init_dist(ep)` joins the process group the launcher describes (torchrun's environment:
``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), with backend
``cpu:gloo,cuda:nccl`` and a collective timeout (``MOELAB_DIST_TIMEOUT`` seconds, default
120: a rank whose peer died ends with an error instead of hanging), and builds a mesh of
``dp = world / ep`` rows by ``ep`` columns: ranks ``[d*ep, (d+1)*ep)`` share one copy of
the experts, each holding E/ep of them; ranks with the same ep index hold the same experts
and form a dp group. `DistContext` is what the rest of `moelab.dist` takes: plain state
(groups, ranks, sizes), never part of a config.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moelab.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the ``dp x ep`` mesh."""

    mesh: object  # torch.distributed.device_mesh.DeviceMesh
    ep_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    world_group: dist.ProcessGroup
    rank: int
    world_size: int
    ep_rank: int
    ep_size: int
    dp_rank: int
    dp_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def timeout_s() -> float:
    raw = os.environ.get("MOELAB_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"MOELAB_DIST_TIMEOUT={raw!r} must be a number of seconds") from None
    if value <= 0:
        raise ConfigError(f"MOELAB_DIST_TIMEOUT={raw!r} must be > 0 seconds")
    return value


def check_sizes(world_size: int, ep: int) -> None:
    """One clear error for an EP size the world cannot hold (before any collective)."""
    if not isinstance(ep, int) or ep < 1:
        raise ConfigError(f"--ep must be an integer >= 1, got {ep!r}")
    if ep > world_size:
        raise ConfigError(f"--ep {ep} is larger than the world size {world_size} (launch at least {ep} processes)")
    if world_size % ep:
        raise ConfigError(f"--ep {ep} does not divide the world size {world_size}: dp x ep must equal the world")


def init_dist(ep: int, *, device: str = "cpu") -> DistContext:
    """Join (or reuse) the default process group and build the ``dp x ep`` mesh."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for expert parallelism but no CUDA device is available")
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ConfigError(f"expert parallelism needs a launcher: {', '.join(missing)} not set "
                              "(run under torchrun, or `moelab train --nproc N`)")
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # "cpu:gloo,cuda:nccl" where NCCL is built in (a CPU-only torch has gloo alone).
        backend = "cpu:gloo,cuda:nccl" if dist.is_nccl_available() else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s()))
    world, rank = dist.get_world_size(), dist.get_rank()
    check_sizes(world, ep)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device, (world // ep, ep), mesh_dim_names=("dp", "ep"))
    dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
    return DistContext(
        mesh=mesh, ep_group=mesh.get_group("ep"), dp_group=mesh.get_group("dp"), world_group=dist.group.WORLD,
        rank=rank, world_size=world, ep_rank=mesh.get_local_rank("ep"), ep_size=ep,
        dp_rank=mesh.get_local_rank("dp"), dp_size=world // ep, device=dev,
    )


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
