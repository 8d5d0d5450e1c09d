"""The engine's forward executor: the seam between scheduling and running the model.

The engine (`moelab.serve.engine`) decides *what* runs in a step -- the packed input ids,
the segments of the slot cache they extend, the positions that get logits -- and asks a
`StepExecutor` to run it; it also asks the executor to move cache columns when it repacks
the slots. Everything else (admission, sampling, stop detection, retiring) stays in the
engine. Two implementations:

* `LocalExecutor` (here): the model and its `SlotKVCache` in this process. What the
  engine always did, with no extra work.
* `moelab.serve.ep.PlanBroadcaster`: the same forward with the experts spread over an
  expert-parallel group; rank 0 broadcasts each step's plan before running it, so every
  rank runs the same forward (docs/serve.md, "Over expert parallelism").

`prepare_for_serving` and `slot_cache` are what both sides of an EP run must do
identically to the model and the cache, so they live here rather than in the engine.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import torch

from moelab.errors import MoelabError
from moelab.model import Transformer
from moelab.serve.slots import Segment, SlotKVCache

log = logging.getLogger(__name__)


class ExecutorLostError(MoelabError, RuntimeError):
    """The executor can run no more steps (a rank of an EP group is gone): the engine stops
    (a `MoelabError`: the CLI prints it as one line)."""


class StepExecutor(Protocol):
    """Runs the engine's forwards and owns the cache they write."""

    cache: SlotKVCache
    # How long the engine may sit idle before it must call `idle` (None: forever).
    idle_timeout_s: float | None

    def forward(self, ids: Sequence[int], segments: list[Segment], logits_at: Sequence[int]):
        """One packed forward (`ModelOutput` with logits at `logits_at` and the routing)."""

    def move(self, src: int, dst: int, length: int) -> None: ...

    def swap(self, a: int, b: int, length_a: int, length_b: int) -> None: ...

    def idle(self) -> None:
        """The engine has nothing to run right now (a heartbeat point)."""

    def close(self) -> None:
        """No more steps (idempotent)."""


def prepare_for_serving(model: Transformer) -> None:
    """Put `model` in serving mode: eval, and token dropping off (which tokens an expert
    drops depends on what else is in the batch, and a request's output must not depend on
    its neighbours)."""
    model.eval()
    for moe in model.moe_layers:
        if getattr(moe.dispatcher, "capacity_factor", None) is not None:
            log.warning("serving switches off token dropping (capacity_factor=%s): batching must not change outputs",
                        moe.dispatcher.capacity_factor)
            moe.dispatcher.capacity_factor = None


def slot_cache(model: Transformer, *, slots: int, max_len: int) -> SlotKVCache:
    """The engine's KV cache for `model`: `slots` rows of `max_len` columns, in the model's
    dtype and on its device."""
    cfg, weight = model.cfg, model.embed_tokens.weight
    return SlotKVCache(n_layers=cfg.n_layers, slots=slots, max_len=max_len, n_kv_heads=cfg.kv_heads,
                       head_dim=cfg.dim_head, v_head_dim=cfg.value_dim, dtype=weight.dtype, device=weight.device)


def packed_forward(model: Transformer, cache: SlotKVCache, ids: Sequence[int], segments: list[Segment],
                   logits_at: Sequence[int]):
    """The engine's forward: `ids` as one packed row over `segments` of `cache`."""
    dev = cache.device
    return model(torch.tensor([ids], device=dev), cache=cache.packed(segments),
                 logits_at=torch.tensor(logits_at, dtype=torch.long, device=dev), telemetry=False,
                 return_routing=True)


class LocalExecutor:
    """The model and its cache in this process."""

    idle_timeout_s: float | None = None

    def __init__(self, model: Transformer, cache: SlotKVCache):
        self.model, self.cache = model, cache

    def forward(self, ids: Sequence[int], segments: list[Segment], logits_at: Sequence[int]):
        return packed_forward(self.model, self.cache, ids, segments, logits_at)

    def move(self, src: int, dst: int, length: int) -> None:
        self.cache.move(src, dst, length)

    def swap(self, a: int, b: int, length_a: int, length_b: int) -> None:
        self.cache.swap(a, b, length_a, length_b)

    def idle(self) -> None:
        pass

    def close(self) -> None:
        pass
