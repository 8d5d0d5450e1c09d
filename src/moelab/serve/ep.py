"""The serving engine over expert parallelism: rank 0 schedules, every rank runs the forward.

Every rank holds the replicated weights, E/ep of each MoE layer's experts
(`moelab.dist.parallel.shard_experts` with ``global_batch=False``) and its own
`SlotKVCache`. Rank 0 runs the HTTP server and the whole engine (admission, batching,
sampling, stop detection) with a `PlanBroadcaster` as its executor; the other ranks run
`follow`, a loop of "receive a plan, run it". A step's plan is everything the forward
and the cache need, as int64 tensors broadcast from rank 0 (gloo):

    header [5]  = kind, P (input ids), S (segments), A (logits positions), M (cache ops)
    payload     = ids [P] | segments [S, 3] (slot, length, n) | logits_at [A] | ops [M, 5]

(two broadcasts: the header says how long the payload is). Cache ops are the slot moves
and swaps the engine made since the last plan (when it repacked its slots on retire and
promote), applied on every rank before the forward, so every rank's cache is rank 0's.
Then every rank runs the same packed forward, whose all-to-alls pair up layer by layer;
only rank 0 samples. Every rank's forward feeds identical tokens, so each rank's output
is the one-process output (the replicated inference `moelab generate --nproc` runs).

Failures. The plan is broadcast before the forward, so whatever rank 0 does outside the
forward (building the plan, sampling, stop strings, callbacks) cannot leave a follower
inside a collective. A forward that raises does so on every rank at the same point (same
code, same weights, same input), so the followers log it and wait for the next plan, and
the engine fails that step's requests and goes on. After a forward fails, rank 0 sends a
heartbeat at once: if a peer is gone (its collectives failed on the closed connection)
that broadcast fails too, and the executor raises `ExecutorLostError`: the engine ends
every request with "error", admits nothing, and the server exits. A forward that fails on
one rank only (a rank-local fault) leaves its peers in a collective until the process
group's timeout (``MOELAB_DIST_TIMEOUT``), and then the same happens.

Idle: a follower blocks in the broadcast; the engine sends a heartbeat plan when it has
been idle for ``heartbeat_s`` (a few seconds, well inside the collective timeout), so an
idle server neither spins the followers nor lets their broadcast time out. Shutdown: the
engine's last act (drain done, or never started) is a shutdown plan; followers return.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moelab.dist.mesh import DistContext, timeout_s
from moelab.model import Transformer
from moelab.serve.engine import EngineConfig, slot_columns
from moelab.serve.executor import ExecutorLostError, packed_forward, prepare_for_serving, slot_cache
from moelab.serve.slots import Segment, SlotKVCache

log = logging.getLogger(__name__)

STEP, HEARTBEAT, SHUTDOWN = 1, 2, 3
MOVE, SWAP = 0, 1


@dataclass(frozen=True)
class StepPlan:
    """What one rank needs to run one engine step (or to know there is none)."""

    kind: int
    ids: tuple[int, ...] = ()
    segments: tuple[Segment, ...] = ()
    logits_at: tuple[int, ...] = ()
    cache_ops: tuple[tuple[int, int, int, int, int], ...] = ()  # (MOVE, src, dst, length, 0) / (SWAP, a, b, la, lb)


def _reason(e: BaseException) -> str:
    """gloo's error in a few words: ``[.../pair.cc:553] Connection closed by peer [addr]. This
    is typically...`` -> ``Connection closed by peer [addr]``."""
    first = (str(e).splitlines() or [type(e).__name__])[0]
    return re.sub(r"^\[[^\]]*\]\s*", "", first).split(". ")[0] or type(e).__name__


def encode_plan(plan: StepPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """(header [5], payload) int64 tensors of `plan` (see the module docstring)."""
    seg = [v for s in plan.segments for v in (s.slot, s.length, s.n)]
    ops = [v for op in plan.cache_ops for v in op]
    header = torch.tensor([plan.kind, len(plan.ids), len(plan.segments), len(plan.logits_at), len(plan.cache_ops)],
                          dtype=torch.long)
    payload = torch.tensor([*plan.ids, *seg, *plan.logits_at, *ops], dtype=torch.long)
    return header, payload


def payload_size(header: torch.Tensor) -> int:
    _, P, S, A, M = header.tolist()
    return P + 3 * S + A + 5 * M


def decode_plan(header: torch.Tensor, payload: torch.Tensor) -> StepPlan:
    """The inverse of `encode_plan`."""
    kind, P, S, A, M = header.tolist()
    flat = payload.tolist()
    ids, rest = flat[:P], flat[P:]
    seg, rest = rest[: 3 * S], rest[3 * S :]
    at, ops = rest[:A], rest[A:]
    return StepPlan(
        kind=kind, ids=tuple(ids), segments=tuple(Segment(*seg[i : i + 3]) for i in range(0, 3 * S, 3)),
        logits_at=tuple(at), cache_ops=tuple(tuple(ops[i : i + 5]) for i in range(0, 5 * M, 5)),
    )


def apply_cache_ops(cache: SlotKVCache, ops: Sequence[tuple[int, int, int, int, int]]) -> None:
    for op, a, b, la, lb in ops:
        if op == MOVE:
            cache.move(a, b, la)
        elif op == SWAP:
            cache.swap(a, b, la, lb)
        else:
            raise ValueError(f"unknown cache op {op}")


def ep_cache(model: Transformer, config: EngineConfig) -> SlotKVCache:
    """Serving mode and the slot cache, identical on every rank (before any plan)."""
    prepare_for_serving(model)
    return slot_cache(model, slots=config.max_num_seqs, max_len=slot_columns(model.cfg, config))


def default_heartbeat_s() -> float:
    """A quarter of the collective timeout, at most 5 s: a follower's broadcast never times out
    while rank 0 is alive, and a lost follower is noticed within seconds even when idle."""
    return min(5.0, timeout_s() / 4)


class PlanBroadcaster:
    """Rank 0's `StepExecutor`: broadcast each step's plan, then run it like every rank."""

    def __init__(self, model: Transformer, config: EngineConfig, ctx: DistContext, *, heartbeat_s: float | None = None):
        if ctx.rank != 0:
            raise ValueError(f"PlanBroadcaster runs on rank 0; this is rank {ctx.rank} (ranks > 0 run `follow`)")
        if ctx.dp_size != 1:
            raise ValueError(f"serving over EP needs dp=1 (world = ep); got dp={ctx.dp_size}")
        self.model, self.ctx = model, ctx
        self.cache = ep_cache(model, config)
        self.idle_timeout_s = heartbeat_s if heartbeat_s is not None else default_heartbeat_s()
        self._ops: list[tuple[int, int, int, int, int]] = []
        self._last = time.monotonic()
        self._closed = False

    def _send(self, plan: StepPlan) -> None:
        header, payload = encode_plan(plan)
        try:
            dist.broadcast(header, 0, group=self.ctx.world_group)
            if payload.numel():
                dist.broadcast(payload, 0, group=self.ctx.world_group)
        except Exception as e:  # the plan is the one collective nothing but a lost peer can fail
            self._closed = True
            raise ExecutorLostError(f"expert-parallel rank lost (broadcasting the step plan failed: {_reason(e)})") from e
        self._last = time.monotonic()

    def forward(self, ids: Sequence[int], segments: list[Segment], logits_at: Sequence[int]):
        if self._closed:
            raise ExecutorLostError("the expert-parallel group is closed")
        ops, self._ops = tuple(self._ops), []
        self._send(StepPlan(STEP, tuple(ids), tuple(segments), tuple(logits_at), ops))
        try:
            return packed_forward(self.model, self.cache, ids, segments, logits_at)
        except Exception:
            # Every rank raised here (see the module docstring), or a peer is gone: a heartbeat
            # tells which (it raises ExecutorLostError in the second case).
            self._send(StepPlan(HEARTBEAT))
            raise

    def move(self, src: int, dst: int, length: int) -> None:
        if src != dst and length:
            self.cache.move(src, dst, length)
            self._ops.append((MOVE, src, dst, length, 0))

    def swap(self, a: int, b: int, length_a: int, length_b: int) -> None:
        if a != b:
            self.cache.swap(a, b, length_a, length_b)
            self._ops.append((SWAP, a, b, length_a, length_b))

    def idle(self) -> None:
        if not self._closed and time.monotonic() - self._last >= self.idle_timeout_s:
            self._send(StepPlan(HEARTBEAT))

    def close(self) -> None:
        """Tell the followers to return (once; a lost group is not told)."""
        if not self._closed:
            self._closed = True
            try:
                self._send(StepPlan(SHUTDOWN))
            except ExecutorLostError as e:
                log.warning("could not tell the followers to stop: %s", e)


@dataclass
class FollowStats:
    steps: int = 0
    heartbeats: int = 0
    failed_steps: int = 0


def receive_plan(ctx: DistContext) -> StepPlan:
    header = torch.empty(5, dtype=torch.long)
    dist.broadcast(header, 0, group=ctx.world_group)
    payload = torch.empty(payload_size(header), dtype=torch.long)
    if payload.numel():
        dist.broadcast(payload, 0, group=ctx.world_group)
    return decode_plan(header, payload)


def follow(model: Transformer, config: EngineConfig, ctx: DistContext,
           on_step: Callable[[StepPlan, object], None] | None = None) -> FollowStats:
    """A rank > 0 of a served EP group: run rank 0's plans until it broadcasts shutdown.

    Rank 0's outputs depend only on its own rows (each rank's tokens are its own batch), so
    a follower's cache is checked through its own logits: `on_step(plan, output)` sees
    them after every step (tests compare their argmax with rank 0's tokens).

    Returns on the shutdown plan; raises when rank 0 is gone (the broadcast fails on the
    closed connection, or times out after ``MOELAB_DIST_TIMEOUT`` without a heartbeat).
    """
    if ctx.rank == 0:
        raise ValueError("follow runs on ranks > 0; rank 0 runs the engine with a PlanBroadcaster")
    cache = ep_cache(model, config)
    stats = FollowStats()
    while True:
        try:
            plan = receive_plan(ctx)
        except Exception as e:
            raise ExecutorLostError(f"rank {ctx.rank}: rank 0 is gone (receiving the step plan failed: "
                                    f"{_reason(e)})") from e
        if plan.kind == SHUTDOWN:
            return stats
        if plan.kind == HEARTBEAT:
            stats.heartbeats += 1
            continue
        apply_cache_ops(cache, plan.cache_ops)
        try:
            with torch.inference_mode():
                out = packed_forward(model, cache, plan.ids, list(plan.segments), plan.logits_at)
            stats.steps += 1
            if on_step is not None:
                on_step(plan, out)
        except Exception:  # rank 0 failed the same way and fails the step's requests
            stats.failed_steps += 1
            log.exception("rank %d: a step failed (rank 0 ends its requests with 'error')", ctx.rank)
