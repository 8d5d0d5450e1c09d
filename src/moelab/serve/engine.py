"""The continuous-batching engine: one thread owns the model and runs steps; requests are
admitted and retired at every step (iteration-level batching, Orca / vLLM).

Legend: B decoding rows, C prefill chunk, V vocab, N slots.

A step (`Engine.step`), in order:
  1. **Admit** waiting requests first come first served while a slot is free. A slot holds
     ``max_len`` columns and `submit` refused any request whose ``prompt + max_tokens``
     does not fit, so an admitted request is never preempted (SGLang's reservation rule).
  2. **Batch** one token for every running request that has its prompt in the cache,
     then prefill chunks of the requests still reading their prompt, in admission order,
     up to the step's token budget (``max_batch_tokens``). A long prompt is spread over
     several steps, so it cannot stall the running requests' inter-token latency by more
     than one chunk (Sarathi's chunked prefill).
  3. **Forward** all of it as one packed sequence (`moelab.serve.slots.PackedBatch`):
     every layer but attention is per token, so the MoE layers see the decodes and the
     prefill chunks together and read each expert's weights once per step -- where an
     MoE pays off, since an expert costs the same to read for one token as for sixteen.
     Attention runs per request inside the packed batch. Logits are computed only at
     each request's last position.
  4. **Sample** each row with its own settings and generator, append, detect stop tokens
     and stop strings, and hand new text to each request's callback.
  5. **Retire** finished or aborted requests at once, freeing their slots, and move the
     requests whose prompt is done into the decoding range.

Slot layout (`moelab.serve.slots`): the running requests occupy slots ``[0, n)``, the
decoding ones first (``[0, n_dec)``), then the prefilling ones, so the decode forward is
a view of the cache, never a gather. Keeping it packed costs one copy of a request's
filled columns when a hole opens (`SlotKVCache.move`), once per request.

The forward runs through a `moelab.serve.executor.StepExecutor`, which also owns the cache
and carries out the slot moves: `LocalExecutor` (the default) runs the model here;
`moelab.serve.ep.PlanBroadcaster` broadcasts each step's plan to the other ranks of an
expert-parallel group first, so every rank runs the same forward (docs/serve.md).

What serving changes in the model: token dropping (``capacity_factor``) is switched off,
because which tokens an expert drops depends on what else is in the batch, and a
request's output must not depend on its neighbours ("batching is invisible").
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from moelab.errors import ConfigError
from moelab.infer.generate import Decoder, stream_delta
from moelab.infer.sampling import SamplingConfig, sample_next
from moelab.model import Transformer
from moelab.serve.executor import (
    ExecutorLostError,
    LocalExecutor,
    StepExecutor,
    prepare_for_serving,
    slot_cache,
)
from moelab.serve.slots import Segment
from moelab.serve.types import (
    EngineClosedError,
    EventCallback,
    GenerationRequest,
    QueueFullError,
    StreamEvent,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    max_num_seqs: int = 8  # slots: requests running at once
    max_batch_tokens: int = 512  # tokens per step: one per decoding request plus prefill chunks
    max_queue: int = 64  # waiting requests before `submit` raises QueueFullError
    max_len: int | None = None  # columns per slot (prompt + max_tokens); default: the model's max_seq_len
    # "continuous": admit into any free slot at every step (the default). "dynamic": the
    # request-level batching it replaced, kept to measure against: a batch starts only when
    # the engine is empty, waits up to `batch_window` after its first request for more
    # (up to max_num_seqs), and runs until every request in it is done; requests that arrive
    # meanwhile wait, and slots freed early stay empty.
    batching: str = "continuous"
    batch_window: float = 0.0

    def __post_init__(self) -> None:
        if self.batching not in ("continuous", "dynamic"):
            raise ConfigError(f"EngineConfig.batching must be 'continuous' or 'dynamic', got {self.batching!r}")
        if not (isinstance(self.batch_window, int | float) and self.batch_window >= 0):
            raise ConfigError(f"EngineConfig.batch_window must be a number >= 0, got {self.batch_window!r}")
        for name in ("max_num_seqs", "max_batch_tokens", "max_queue"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"EngineConfig.{name} must be an integer >= 1, got {v!r}")
        if self.max_batch_tokens < self.max_num_seqs:
            raise ConfigError(
                f"EngineConfig.max_batch_tokens={self.max_batch_tokens} must be >= max_num_seqs={self.max_num_seqs} "
                "(every running request decodes one token per step)"
            )
        if self.max_len is not None and (not isinstance(self.max_len, int) or self.max_len < 2):
            raise ConfigError(f"EngineConfig.max_len must be an integer >= 2 or None, got {self.max_len!r}")


def slot_columns(model_cfg, config: EngineConfig) -> int:
    """Columns per slot: ``EngineConfig.max_len``, by default the model's max_seq_len."""
    max_len = config.max_len or model_cfg.max_seq_len
    if max_len > model_cfg.max_seq_len:
        raise ConfigError(f"EngineConfig.max_len={max_len} exceeds the model's max_seq_len={model_cfg.max_seq_len}")
    return max_len


@dataclass
class EngineStats:
    running: int
    waiting: int
    slots: int
    steps: int
    prompt_tokens: int  # prompt tokens prefilled so far
    generation_tokens: int  # tokens generated so far
    finished: dict[str, int]  # finish reason -> requests
    expert_tokens: dict[int, list[int]]  # MoE layer -> tokens routed to each expert (served traffic)
    decode_rows: int = 0  # rows decoded summed over steps (mean batch = decode_rows / decode_steps)
    decode_steps: int = 0


@dataclass(eq=False)
class _Running:
    """One request's state inside the engine."""

    req: GenerationRequest
    on_event: EventCallback
    generator: torch.Generator | None
    sampling: SamplingConfig
    slot: int = -1
    length: int = 0  # cache columns filled
    fed: int = 0  # prompt tokens prefilled
    out_ids: list[int] = field(default_factory=list)
    text: str = ""
    shown: int = 0  # characters of `text` already sent
    next_token: int = -1  # the last sampled token: the next decode step's input
    finish_reason: str | None = None
    submitted: float = field(default_factory=time.monotonic)

    @property
    def prefilled(self) -> bool:
        return self.fed == len(self.req.prompt_ids)


class Engine:
    """Owns the model; `start` runs `step` on its own thread until `shutdown`.

    `submit`, `abort`, `stats` and `shutdown` are thread-safe. Without `start`, a caller
    may drive the engine itself with `step` (tests, benchmarks) from one thread.
    """

    def __init__(self, model: Transformer, config: EngineConfig | None = None, *, tokenizer: Decoder | None = None,
                 executor: StepExecutor | None = None):
        self.model, self.config, self.tokenizer = model, config or EngineConfig(), tokenizer
        cfg = model.cfg
        self.max_len = slot_columns(cfg, self.config)
        if executor is None:
            prepare_for_serving(model)
            executor = LocalExecutor(model, slot_cache(model, slots=self.config.max_num_seqs, max_len=self.max_len))
        elif (executor.cache.slots, executor.cache.max_len) != (self.config.max_num_seqs, self.max_len):
            raise ConfigError(f"the executor's cache has {executor.cache.slots} slots of {executor.cache.max_len} "
                              f"columns; EngineConfig asks for {self.config.max_num_seqs} of {self.max_len}")
        self.executor = executor
        self.cache = executor.cache
        self.device = executor.cache.device
        # A packed step is one sequence for the model's max_seq_len check.
        self.budget = min(self.config.max_batch_tokens, cfg.max_seq_len)
        self._moe_index = [i for i, b in enumerate(model.layers) if b.is_moe]
        E = cfg.moe.num_experts if cfg.moe is not None else 0
        self._expert_counts_LE = torch.zeros(len(self._moe_index), E, dtype=torch.long)  # rows: _moe_index
        self._slots: list[_Running] = []  # index = slot; decoding ones first
        self._n_dec = 0
        self._waiting: deque[_Running] = deque()
        self._aborts: set[str] = set()
        self._lock = threading.Condition()
        self._closing = False
        self._stop = False
        self._drain_deadline: float | None = None
        self._thread: threading.Thread | None = None
        self._steps = self._prompt_tokens = self._gen_tokens = 0
        self._decode_rows = self._decode_steps = 0
        self._finished: dict[str, int] = {}
        # Set when the executor is lost (`ExecutorLostError`): why the engine stopped. The
        # engine then admits nothing and calls `on_lost(message)` (the server exits).
        self.lost: str | None = None
        self.on_lost: Callable[[str], None] | None = None

    # ------------------------------------------------------------------ API (any thread)

    def submit(self, request: GenerationRequest, on_event: EventCallback) -> None:
        """Queue `request`; its events go to `on_event` (called on the engine thread)."""
        V = self.model.cfg.vocab_size
        bad = next((t for t in request.prompt_ids if not (isinstance(t, int) and 0 <= t < V)), None)
        if bad is not None:
            raise ConfigError(f"prompt: token id {bad!r} is outside [0, vocab_size={V})")
        need = len(request.prompt_ids) + request.max_tokens
        if need > self.max_len:
            raise ConfigError(
                f"prompt: {len(request.prompt_ids)} prompt tokens + max_tokens={request.max_tokens} = {need} "
                f"exceeds the context of {self.max_len} tokens"
            )
        sampling = SamplingConfig(temperature=request.temperature, top_k=request.top_k, top_p=request.top_p,
                                  seed=request.seed)
        generator = None
        if request.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(request.seed)
        run = _Running(request, on_event, generator, sampling)
        with self._lock:
            if self._closing:
                raise EngineClosedError(f"the engine has stopped: {self.lost}" if self.lost else
                                        "the server is shutting down and admits no new requests")
            if len(self._waiting) >= self.config.max_queue:
                raise QueueFullError(
                    f"the queue is full ({self.config.max_queue} requests waiting); retry later",
                    retry_after_s=1.0,
                )
            self._waiting.append(run)
            self._lock.notify()

    def abort(self, request_id: str) -> None:
        """End the request (queued or running) with finish_reason "abort" at the next step."""
        with self._lock:
            self._aborts.add(request_id)
            self._lock.notify()

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(
                running=len(self._slots), waiting=len(self._waiting), slots=self.config.max_num_seqs,
                steps=self._steps, prompt_tokens=self._prompt_tokens, generation_tokens=self._gen_tokens,
                finished=dict(self._finished),
                expert_tokens=dict(zip(self._moe_index, self._expert_counts_LE.tolist(), strict=True)),
                decode_rows=self._decode_rows, decode_steps=self._decode_steps,
            )

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("Engine.start: already started")
        self._thread = threading.Thread(target=self._loop, name="moelab-engine", daemon=True)
        self._thread.start()

    def shutdown(self, drain_timeout_s: float = 30.0) -> None:
        """Admit nothing new; let queued and running requests finish for up to
        `drain_timeout_s`, then end what is left with finish_reason "shutdown"."""
        with self._lock:
            self._closing = True
            self._drain_deadline = time.monotonic() + drain_timeout_s
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()
        else:  # never started: nothing runs, end what is queued
            self._end_all("shutdown")
            self.executor.close()

    # ----------------------------------------------------------------- the engine thread

    def _loop(self) -> None:
        try:
            while True:
                beat = False
                with self._lock:
                    while not (self._waiting or self._slots or self._aborts or self._closing):
                        # A local executor waits for ever; an EP one must tell its followers
                        # it is alive before their collective times out.
                        if not self._lock.wait(timeout=self.executor.idle_timeout_s):
                            beat = True
                            break
                    if not beat and self._closing and (
                            not (self._waiting or self._slots) or time.monotonic() >= self._drain_deadline):
                        break
                if beat:
                    self.executor.idle()
                    continue
                if not self.guarded_step():  # only queued requests, held by the dynamic batch window
                    self.executor.idle()
                    with self._lock:
                        self._lock.wait(timeout=0.001)
        except ExecutorLostError as e:  # no step can run any more: fail everything, admit nothing
            log.error("engine stopped: %s", e)
            self.lost = str(e)
            with self._lock:
                self._closing = True
            self._end_all("error", error=str(e))
            if self.on_lost is not None:
                self.on_lost(str(e))
            return
        self._end_all("shutdown")
        self.executor.close()

    def guarded_step(self) -> bool:
        """`step` as the engine thread runs it: a step that raises fails the running requests
        with "error" and the engine goes on; only `ExecutorLostError` propagates."""
        try:
            return self.step()
        except ExecutorLostError:
            raise
        except Exception as e:  # the engine must outlive one bad step: fail its requests
            log.exception("engine step failed")
            self._end_all("error", error=f"{type(e).__name__}: {e}")
            return True

    def step(self) -> bool:
        """One engine step; False when there was nothing to do."""
        self._apply_aborts()
        self._admit()
        if not self._slots:
            return False
        with torch.inference_mode():
            rows = self._forward()
            self._sample(rows)
        self._steps += 1
        for run in [r for r in self._slots if r.finish_reason is not None]:
            self._retire(run)
        for run in list(self._slots[self._n_dec :]):
            if run.prefilled and run.finish_reason is None:
                self._promote(run)
        return True

    def _apply_aborts(self) -> None:
        with self._lock:
            aborts, self._aborts = self._aborts, set()
            if not aborts:
                return
            keep: deque[_Running] = deque()
            for run in self._waiting:
                (self._finish_queued if run.req.request_id in aborts else keep.append)(run)
            self._waiting = keep
        for run in [r for r in self._slots if r.req.request_id in aborts]:
            run.finish_reason = "abort"
            self._emit(run, [], "")
            self._retire(run)

    def _finish_queued(self, run: _Running) -> None:
        run.finish_reason = "abort"
        self._emit(run, [], "")

    def _admit(self) -> None:
        with self._lock:
            if self.config.batching == "dynamic":
                if self._slots or not self._waiting:
                    return  # a batch is running: nobody joins it
                first = self._waiting[0].submitted
                full = len(self._waiting) >= self.config.max_num_seqs
                if not full and time.monotonic() - first < self.config.batch_window:
                    return  # the batch window is still open: wait for more requests
            while self._waiting and len(self._slots) < self.config.max_num_seqs:
                run = self._waiting.popleft()
                if run.req.max_tokens == 0:  # nothing to generate: no slot, no forward
                    run.finish_reason = "length"
                    self._emit(run, [], "")
                    continue
                run.slot = len(self._slots)
                self._slots.append(run)

    def _forward(self) -> list[tuple[_Running, torch.Tensor, dict | None]]:
        """One packed forward: a token for every decoding request, then prefill chunks up
        to the token budget. (request, next-token logits [V], routing of that position)
        for every request that gets a new token this step."""
        budget = self.budget
        decoding = self._slots[: self._n_dec]
        segments = [Segment(r.slot, r.length, 1) for r in decoding]
        ids: list[int] = [r.next_token for r in decoding]
        budget -= len(decoding)
        finishing: list[_Running] = list(decoding)  # requests whose last position gets logits
        prefilled: list[tuple[_Running, int]] = []
        for run in self._slots[self._n_dec :]:
            if budget <= 0:
                break
            prompt = run.req.prompt_ids
            C = min(budget, len(prompt) - run.fed)
            segments.append(Segment(run.slot, run.length, C))
            ids.extend(prompt[run.fed : run.fed + C])
            prefilled.append((run, C))
            budget -= C
            if run.fed + C == len(prompt):
                finishing.append(run)
        # The flat position of each segment's last token; only those get logits.
        ends, p = [], 0
        for s in segments:
            p += s.n
            ends.append(p - 1)
        last = {id(r): i for i, r in enumerate([*decoding, *(r for r, _ in prefilled)])}
        at = [ends[last[id(r)]] for r in finishing]
        out = self.executor.forward(ids, segments, at)
        self._count_experts(out.routing)
        for run in decoding:
            run.length += 1
        for run, C in prefilled:
            run.fed += C
            run.length += C
            self._prompt_tokens += C
        if decoding:
            self._decode_rows += len(decoding)
            self._decode_steps += 1
        logits_RV = out.logits[0]
        return [(run, logits_RV[i], _routing_at(out.routing, at[i]) if run.req.return_routing else None)
                for i, run in enumerate(finishing)]

    def _count_experts(self, routing: dict | None) -> None:
        """Add this step's routed tokens per (MoE layer, expert): one bincount for all layers.
        (Serving drops nothing -- capacity is off -- so every choice counts.)"""
        if not routing:
            return
        E = self._expert_counts_LE.shape[1]
        idx_LA = torch.stack([routing[i].expert_idx.reshape(-1) for i in self._moe_index])
        offset_L1 = torch.arange(len(self._moe_index), device=idx_LA.device).unsqueeze(1) * E
        self._expert_counts_LE += torch.bincount((idx_LA + offset_L1).reshape(-1).cpu(),
                                                 minlength=self._expert_counts_LE.numel()).view_as(self._expert_counts_LE)

    def _sample(self, rows: list[tuple[_Running, torch.Tensor, dict | None]]) -> None:
        if not rows:
            return
        greedy = [i for i, (r, _, _) in enumerate(rows) if r.sampling.greedy]
        tokens: list[int] = [0] * len(rows)
        if greedy:  # one argmax for every greedy row
            picked = torch.stack([rows[i][1] for i in greedy]).argmax(-1).tolist()
            for i, t in zip(greedy, picked, strict=True):
                tokens[i] = t
        for i, (run, logits_V, _) in enumerate(rows):
            if not run.sampling.greedy:  # its own settings and generator: reproducible alone or batched
                tokens[i] = int(sample_next(logits_V.unsqueeze(0), run.sampling, run.generator)[0])
        for (run, _, routing), token in zip(rows, tokens, strict=True):
            self._accept(run, token, routing)

    def _accept(self, run: _Running, token: int, routing: dict | None) -> None:
        """Append one token, update the text, decide whether the request is finished."""
        req = run.req
        run.out_ids.append(token)
        run.next_token = token
        self._gen_tokens += 1
        if token in req.stop_token_ids:
            run.finish_reason = "stop"
        elif self.tokenizer is not None:
            # Decode the whole continuation: a character's bytes may span tokens.
            text = self.tokenizer.decode([t for t in run.out_ids if t not in req.stop_token_ids])
            for s in req.stop:
                cut = text.find(s)
                if cut >= 0:
                    text, run.finish_reason = text[:cut], "stop"
                    break
            run.text = text
        if run.finish_reason is None and len(run.out_ids) >= req.max_tokens:
            run.finish_reason = "length"
        delta = stream_delta(run.text, run.shown, req.stop, final=run.finish_reason is not None)
        run.shown += len(delta)
        self._emit(run, [token], delta, [routing] if routing is not None else None)

    def _emit(self, run: _Running, token_ids: list[int], text: str, routing: list[dict] | None = None,
              error: str | None = None) -> None:
        if run.finish_reason is not None:
            self._finished[run.finish_reason] = self._finished.get(run.finish_reason, 0) + 1
            if run.finish_reason in ("abort", "shutdown", "error") and run.shown < len(run.text):
                text += run.text[run.shown :]  # what was held back for a stop string
                run.shown = len(run.text)
        event = StreamEvent(
            request_id=run.req.request_id, token_ids=token_ids, text=text, finish_reason=run.finish_reason,
            prompt_tokens=len(run.req.prompt_ids), completion_tokens=len(run.out_ids), routing=routing, error=error,
        )
        try:
            run.on_event(event)
        except Exception:  # a broken consumer must not take the engine down
            log.exception("event callback of request %s failed; aborting it", run.req.request_id)
            if run.finish_reason is None:
                self.abort(run.req.request_id)

    # ---------------------------------------------------------------- slot bookkeeping

    def _place(self, src: int, dst: int) -> None:
        """Move the request in slot `src` (and its cache columns) into slot `dst`."""
        if src == dst:
            return
        run = self._slots[src]
        self.executor.move(src, dst, run.length)
        self._slots[dst] = run
        run.slot = dst

    def _retire(self, run: _Running) -> None:
        """Free `run`'s slot, keeping the running requests packed: decoding then prefilling."""
        i = run.slot
        if i < self._n_dec:
            self._place(self._n_dec - 1, i)  # the last decoding request fills the hole
            self._place(len(self._slots) - 1, self._n_dec - 1)  # the last prefilling one fills its place
            self._n_dec -= 1
        else:
            self._place(len(self._slots) - 1, i)
        self._slots.pop()
        run.slot = -1

    def _promote(self, run: _Running) -> None:
        """`run` has its whole prompt in the cache: move it into the decoding range."""
        j, d = run.slot, self._n_dec
        if j != d:
            other = self._slots[d]
            self.executor.swap(j, d, run.length, other.length)
            self._slots[d], self._slots[j] = run, other
            run.slot, other.slot = d, j
        self._n_dec += 1

    def _end_all(self, reason: str, error: str | None = None) -> None:
        """End every queued and running request (shutdown, or a failed step)."""
        with self._lock:
            queued, self._waiting = list(self._waiting), deque()
        for run in [*self._slots, *queued]:
            if run.finish_reason is None:
                run.finish_reason = reason
                self._emit(run, [], "", error=error)
        self._slots, self._n_dec = [], 0


def _routing_at(routing: dict | None, row: int) -> dict:
    """``{layer: {"experts", "weights"}}`` of one position of a forward's routing record."""
    return {
        str(layer): {"experts": d.expert_idx[row].tolist(), "weights": [float(w) for w in d.weights[row].float()]}
        for layer, d in (routing or {}).items()
    }


def run_to_completion(engine: Engine, requests: Sequence[GenerationRequest]) -> dict[str, list[StreamEvent]]:
    """Submit `requests` to an engine that is not started and step it until all are done;
    every request's events, by request id. For tests and benchmarks (no threads)."""
    events: dict[str, list[StreamEvent]] = {r.request_id: [] for r in requests}
    for r in requests:
        engine.submit(r, events[r.request_id].append)
    def unfinished() -> bool:
        return any(not ev or ev[-1].finish_reason is None for ev in events.values())

    while unfinished():
        if not engine.step() and unfinished():
            if not engine.stats().waiting:
                raise RuntimeError("engine stopped stepping with requests unfinished")
            time.sleep(0.001)  # the dynamic batch window is open
    return events
