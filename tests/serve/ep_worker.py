"""Worker for the serving-over-EP tests (run by `moelab.dist.launch`, one per rank).

``python ep_worker.py OUT_DIR MODE``: rank 0 runs an `Engine` with a `PlanBroadcaster`,
the other ranks `follow`; each rank writes ``OUT_DIR/MODE.rankR.pt``.

* ``serve``: several concurrent requests with different prompt lengths (chunked prefill
  at 8 tokens a step), one arriving mid-run; a request with the POISON token, whose
  forward raises on every rank inside the last MoE layer (after the first layer's
  all-to-all); a request after it; then the engine on its thread, idle long enough to
  send heartbeats, one more request, and the shutdown.
* ``kill``: rank 1 SIGKILLs itself in its 3rd forward; rank 0 records what its engine
  said (the launcher then ends the job with an error naming rank 1).
* ``kill0``: rank 0 SIGKILLs itself in its 3rd forward; rank 1 records the error `follow`
  raised.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch

from moelab.model import Transformer
from moelab.model.presets import get_preset

V = 256
POISON = 255
MAX_LEN = 64
ENGINE = {"max_num_seqs": 4, "max_batch_tokens": 8, "max_len": MAX_LEN}
PROMPTS = [[5, 9, 2], list(range(10, 21)), list(range(30, 50)), [7]]  # 3, 11, 20 and 1 tokens
LATE = list(range(60, 73))  # 13 tokens, submitted after 3 steps
AFTER = [[1, 2, 3, 4], [100, 101]]  # after the poisoned step; and on the threaded engine
NEW = 6


def build_model() -> Transformer:
    torch.manual_seed(0)
    cfg = get_preset("tiny-moe").with_(vocab_size=V, max_seq_len=MAX_LEN, n_layers=2)
    m = Transformer(cfg).eval()
    with torch.no_grad():  # larger weights: routing and logits vary a lot from token to token (test_engine)
        for p in m.parameters():
            if p.dim() > 1:
                p.mul_(5)
    return m


def poison(model: Transformer) -> None:
    """A forward whose input holds POISON raises in the last MoE layer, on every rank."""
    seen = {}
    model.register_forward_pre_hook(lambda mod, args: seen.__setitem__("ids", args[0]))

    def check(mod, args):
        if (seen["ids"] == POISON).any():
            raise RuntimeError("poisoned token")

    model.moe_layers[-1].register_forward_pre_hook(check)


def die_in_third_forward(model: Transformer) -> None:
    calls = [0]

    def die(mod, args):
        calls[0] += 1
        if calls[0] == 3:
            os.kill(os.getpid(), signal.SIGKILL)

    model.register_forward_pre_hook(die)


def rank0(out: Path, mode: str, ctx) -> None:
    from moelab.serve.engine import Engine, EngineConfig
    from moelab.serve.ep import PlanBroadcaster
    from moelab.serve.types import GenerationRequest

    model = build_model()
    from moelab.dist.parallel import shard_experts

    shard_experts(model, ctx, global_batch=False)
    poison(model)
    config = EngineConfig(**ENGINE)
    executor = PlanBroadcaster(model, config, ctx, heartbeat_s=0.2)
    argmax: list[list[int]] = []  # per completed step: the argmax at every logits position
    forward = executor.forward

    def recording(*args):
        out = forward(*args)
        argmax.append(out.logits[0].argmax(-1).tolist())
        return out

    executor.forward = recording
    engine = Engine(model, config, executor=executor)
    events: dict[str, list] = {}
    done = threading.Event()

    def submit(prompt, key):
        events[key] = []

        def on_event(e):
            events[key].append(e)
            if e.finish_reason is not None and all(ev and ev[-1].finish_reason for ev in events.values()):
                done.set()

        engine.submit(GenerationRequest(prompt_ids=tuple(prompt), max_tokens=NEW, request_id=key), on_event)

    def unfinished():
        return any(not ev or ev[-1].finish_reason is None for ev in events.values())

    result: dict = {}
    if mode == "kill0":
        die_in_third_forward(model)
        for i, p in enumerate(PROMPTS):
            submit(p, f"p{i}")
        while True:
            engine.guarded_step()
    if mode == "kill":
        lost = []
        engine.on_lost = lost.append
        engine.start()
        for i, p in enumerate(PROMPTS):
            submit(p, f"p{i}")
        t0 = time.monotonic()
        done.wait(60)
        result = {"lost": lost, "engine_lost": engine.lost, "seconds": time.monotonic() - t0,
                  "reasons": {k: ev[-1].finish_reason for k, ev in events.items() if ev},
                  "errors": {k: ev[-1].error for k, ev in events.items() if ev}}
        torch.save(result, out / f"{mode}.rank0.pt")
        engine.shutdown(drain_timeout_s=0)
        return
    # Stepped by hand: which requests share a step is fixed, whatever the machine's speed.
    for i, p in enumerate(PROMPTS):
        submit(p, f"p{i}")
    steps = 0
    while unfinished():
        if steps == 3:
            submit(LATE, "late")
        engine.guarded_step()
        steps += 1
    submit([3, POISON, 4], "poison")
    submit(AFTER[0], "after")  # in the same step as the poisoned one: fails with it
    while unfinished():
        engine.guarded_step()
    submit(AFTER[0], "again")
    while unfinished():
        engine.guarded_step()
    # On its thread: idle (heartbeats), a request, the drain and the shutdown plan.
    engine.start()
    time.sleep(1.0)
    done.clear()
    submit(AFTER[1], "threaded")
    assert done.wait(60)
    engine.shutdown(drain_timeout_s=10)
    result = {k: {"tokens": [t for e in ev for t in e.token_ids], "reason": ev[-1].finish_reason,
                  "error": ev[-1].error} for k, ev in events.items()}
    torch.save({"requests": result, "steps": engine.stats().steps, "argmax": argmax}, out / f"{mode}.rank0.pt")


def follower(out: Path, mode: str, ctx) -> None:
    from moelab.dist.parallel import shard_experts
    from moelab.serve.engine import EngineConfig
    from moelab.serve.ep import follow

    model = build_model()
    shard_experts(model, ctx, global_batch=False)
    poison(model)
    if mode == "kill":
        die_in_third_forward(model)
    if mode == "kill0":
        from moelab.serve.executor import ExecutorLostError

        try:
            follow(model, EngineConfig(**ENGINE), ctx)
        except ExecutorLostError as e:
            torch.save({"error": str(e)}, out / f"{mode}.rank{ctx.rank}.pt")
        return
    argmax: list[list[int]] = []
    stats = follow(model, EngineConfig(**ENGINE), ctx,
                   on_step=lambda plan, o: argmax.append(o.logits[0].argmax(-1).tolist()))
    torch.save({"steps": stats.steps, "heartbeats": stats.heartbeats, "failed_steps": stats.failed_steps,
                "argmax": argmax}, out / f"{mode}.rank{ctx.rank}.pt")


def main() -> None:
    torch.set_num_threads(1)
    from moelab.dist.mesh import init_dist, shutdown

    out, mode = Path(sys.argv[1]), sys.argv[2]
    ctx = init_dist(ep=2)
    try:
        (rank0 if ctx.rank == 0 else follower)(out, mode, ctx)
    finally:
        if not mode.startswith("kill"):
            shutdown()


if __name__ == "__main__":
    main()
