"""Independent training runs side by side, one worker process each (`run_parallel`).

Why processes and not threads: the runs that `compare` and the lab train together are
small (d_model 64-128, batch 8), and at that size one torch process does not use two
cores well. On the 2-core machine of BENCHMARKS.md ("The demo's MoE") one run trained at
2662 tokens/s with 2 threads against 3629 with 1, so two one-thread runs side by side
finish two models in about the time of one. Each worker is a fresh ``spawn`` process
(torch's thread pool must not be forked) that loads the prepared data from its cache
entry by memory map, so nothing large is pickled.

What is not lost: every run writes its own run directory as it would in one process. On
Ctrl-C each worker checkpoints its run (the trainer's SIGINT handling) and this module
raises `TrainingInterrupted` for the first one once all have stopped, so ``--resume``
continues them all. A run that fails raises its error here after the runs already going
have finished (their directories are complete; ``--resume`` keeps them); a worker that
dies without a word (killed, out of memory) is a `WorkerLostError` naming the runs.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from moelab import hardware
from moelab.errors import ConfigError, WorkerLostError
from moelab.train.trainer import TrainingInterrupted


def plan_workers(n_runs: int, workers: int | None, threads: int | None = None) -> tuple[int, int]:
    """``(workers, threads per worker)`` for `n_runs` runs.

    `threads` is the total thread budget (default: the CPUs this process may use,
    `moelab.hardware.available_cpus`). ``workers=None``: one per thread of the budget,
    at most one per run; ``workers=1`` means "in this process" (the caller trains one
    run after the other). Each worker gets an equal share of the budget, at least 1.
    """
    for name, value in (("workers", workers), ("threads", threads)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    budget = threads or hardware.available_cpus()
    n = max(1, min(n_runs, budget if workers is None else workers))
    return n, max(1, budget // n)


def _init_worker(threads: int) -> None:
    import signal

    import torch

    torch.set_num_threads(threads)
    # A process group of its own: a terminal's Ctrl-C reaches only the parent, which
    # passes exactly one SIGINT on to each worker (`_forward_sigint`), however it was
    # interrupted. An idle worker ignores it (one dying would break the pool, which then
    # kills the busy ones mid-checkpoint); a training run installs its own handler.
    os.setpgrp()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Out of the parent's group, a worker no longer dies with it (a killed terminal, a CI
    # timeout): it exits as soon as its parent is gone instead of training on alone.
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="moelab-parent-watch", daemon=True).start()


def _forward_sigint(pool: cf.ProcessPoolExecutor) -> None:
    import signal

    # `_processes` is private, but the pool has no public handle on its workers.
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        try:
            os.kill(proc.pid, signal.SIGINT)
        except (ProcessLookupError, AttributeError):
            pass


class _Interrupted:
    """What a worker returns for a run stopped by Ctrl-C: `TrainingInterrupted` itself
    does not survive pickling (its constructor takes the run directory and the step)."""

    def __init__(self, run_dir: Path, step: int) -> None:
        self.run_dir, self.step = run_dir, step


def _call(fn: Callable[..., Any], args: tuple) -> Any:
    try:
        return fn(*args)
    except TrainingInterrupted as e:
        return _Interrupted(e.run_dir, e.step)


def run_parallel(fn: Callable[..., Any], tasks: Sequence[tuple], *, workers: int, threads: int,
                 names: Sequence[str] | None = None, on_wait: Callable[[], None] | None = None,
                 wait_s: float = 20.0) -> list[Any]:
    """``[fn(*task) for task in tasks]``, computed in `workers` spawned processes of
    `threads` torch threads each, in the order of `tasks` (submit the longest first).

    `fn` must be importable by name (a module-level function) and its arguments and
    result picklable. A worker that dies (killed, out of memory) is a `WorkerLostError`
    naming the runs (`names`, default "task <i>") that did not finish. `on_wait` is
    called every `wait_s` seconds while runs are still going (progress lines: the
    workers show no progress bars, which would interleave)."""
    labels = list(names) if names is not None else [f"task {i}" for i in range(len(tasks))]
    try:
        return _run_parallel(fn, tasks, workers=workers, threads=threads, on_wait=on_wait, wait_s=wait_s)
    except cf.process.BrokenProcessPool as e:
        raise WorkerLostError(
            f"a worker process died (killed, or out of memory?) while training: {', '.join(labels)} did not all "
            f"finish ({e}); each run directory keeps what it wrote, and --resume continues from the last "
            "checkpoints") from None


def _run_parallel(fn: Callable[..., Any], tasks: Sequence[tuple], *, workers: int, threads: int,
                  on_wait: Callable[[], None] | None, wait_s: float) -> list[Any]:
    results: list[Any] = [None] * len(tasks)
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                initargs=(threads,)) as pool:
        futures = {pool.submit(_call, fn, task): i for i, task in enumerate(tasks)}
        try:
            pending = set(futures)
            while pending:
                done, pending = cf.wait(pending, timeout=wait_s if on_wait else None,
                                        return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    results[futures[fut]] = fut.result()
                if pending and on_wait is not None:
                    on_wait()
        except BaseException as e:
            # Ctrl-C: each worker checkpoints its run (a second Ctrl-C stops them at once).
            # An error: the runs already going finish their directories. Start nothing new.
            for fut in futures:
                fut.cancel()
            interrupts = 0
            if isinstance(e, KeyboardInterrupt):
                _forward_sigint(pool)
                interrupts = 1
            while True:
                try:
                    cf.wait(futures)
                    break
                except KeyboardInterrupt:
                    _forward_sigint(pool)
                    interrupts += 1
            stopped = [r for r in (f.result() for f in futures if f.done() and not f.cancelled()
                                   and f.exception() is None) if isinstance(r, _Interrupted)]
            if interrupts and stopped:
                raise TrainingInterrupted(stopped[0].run_dir, stopped[0].step) from None
            raise
    stopped = [r for r in results if isinstance(r, _Interrupted)]
    if stopped:
        raise TrainingInterrupted(stopped[0].run_dir, stopped[0].step)
    return results
