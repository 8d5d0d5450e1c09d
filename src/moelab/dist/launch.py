"""A local launcher: N processes on this machine with torchrun's environment.

`launch(argv, nproc)` starts ``python argv...`` N times with ``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` (a free port) and one thread each
(``OMP_NUM_THREADS=1`` unless set), like ``torchrun --standalone --nproc-per-node N``
(which works as well: moelab only reads that environment). Fail-fast: when a rank exits
with an error, the others are ended (they would otherwise wait in a collective until the
gloo timeout), and `LaunchError` reports the first failure and the tail of its output; a
job past ``timeout_s`` is ended the same way.

``forward_signals=(0,)`` (`moelab serve --nproc`): the ranks run in their own process
group, and a SIGINT or SIGTERM the launcher gets (a terminal's Ctrl-C included) is passed
to those ranks only, and the launcher waits for them to end the job themselves
(rank 0 of a served EP group drains, then tells the others to stop); such a rank ending by
that signal is a clean exit. Without it the launcher keeps Python's default handling.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from moelab.errors import MoelabError


class LaunchError(MoelabError, RuntimeError):
    """A rank failed, or the job ran past its timeout; every rank has been ended."""


@dataclass
class RankResult:
    rank: int
    returncode: int
    output: str


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def launch(argv: list[str], nproc: int, *, timeout_s: float = 300.0, env: dict[str, str] | None = None,
           threads: int = 1, grace_s: float = 5.0, echo_rank0: bool = False,
           forward_signals: tuple[int, ...] | None = None) -> list[RankResult]:
    """Run ``python *argv`` on `nproc` ranks; return each rank's output once all succeed."""
    if nproc < 1:
        raise LaunchError(f"--nproc must be >= 1, got {nproc}")
    port = free_port()
    procs, logs = [], []
    tmp = Path(tempfile.mkdtemp(prefix="moelab-launch-"))
    for rank in range(nproc):
        e = {**os.environ, **(env or {})}
        e.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        e.setdefault("OMP_NUM_THREADS", str(threads))
        out = None if (echo_rank0 and rank == 0) else open(tmp / f"rank{rank}.log", "w+")  # noqa: SIM115
        logs.append(out)
        # Forwarding: the ranks get a process group of their own, so a terminal's Ctrl-C reaches
        # the launcher alone and each chosen rank gets the signal once (twice, uvicorn forces
        # its exit and skips the graceful part).
        procs.append(subprocess.Popen([sys.executable, *argv], env=e, stdout=out,
                                      stderr=subprocess.STDOUT if out is not None else None,
                                      process_group=0 if forward_signals else None))
    forwarded: dict[int, int] = {}  # rank -> the signal it was sent

    def forward(signum, frame) -> None:
        for r in forward_signals or ():
            if procs[r].poll() is None:
                procs[r].send_signal(signum)
                forwarded[r] = signum

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)} if forward_signals else {}

    def clean(rank: int, code: int | None) -> bool:
        # Killed by the forwarded signal, or exited 128 + it (a CLI's KeyboardInterrupt exit 130).
        return code == 0 or (rank in forwarded and code in (-forwarded[rank], 128 + forwarded[rank]))

    deadline = time.monotonic() + timeout_s
    failure: str | None = None
    first_bad: int | None = None  # the rank that failed first: its error is the cause, the others' follow
    try:
        while True:
            codes = [p.poll() for p in procs]
            bad = [(r, c) for r, c in enumerate(codes) if c is not None and not clean(r, c)]
            if bad and failure is None:
                r, c = bad[0]
                first_bad = r
                failure = f"rank {r} exited with code {c}"
                deadline = min(deadline, time.monotonic() + grace_s)  # let the others report, then end them
            if all(c is not None for c in codes):
                break
            if time.monotonic() > deadline:
                failure = failure or f"the job ran past its timeout of {timeout_s:.0f} s"
                break
            time.sleep(0.05)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    results = []
    for rank, (p, log) in enumerate(zip(procs, logs, strict=True)):
        text = ""
        if log is not None:
            log.seek(0)
            text = log.read()
            log.close()
        results.append(RankResult(rank, p.returncode, text))
    if failure is not None or any(not clean(r.rank, r.returncode) for r in results):
        first = results[first_bad] if first_bad is not None else results[0]
        said = (f"rank {first.rank}'s output is above" if echo_rank0 and first.rank == 0
                else f"rank {first.rank}'s output:\n{_tail(first.output)}")
        raise LaunchError(f"{failure or f'rank {first.rank} failed'}; every rank has been ended. {said}")
    return results
