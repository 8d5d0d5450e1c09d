"""The Break panel: lab experiments started from the page, one training at a time, streamed.

A run is an ordinary lab experiment folder under the playground's runs folder
(``RUNS/<id>/experiment.json`` + one run directory per paired run), so `moelab report RUNS`
and ``moelab lab NAME --out RUNS/<id> --resume`` read it like any other. Beside it,
``playground.json`` holds the request and the run's state.

Each experiment trains in a subprocess (`moelab.playground.worker`): the trainer's
cooperative stop is its SIGINT handler, which only the main thread of a process can
install, and a subprocess keeps torch's threads out of the server. Stop is one SIGINT:
the trainer finishes the step in flight, writes a checkpoint and the worker exits 130,
so the run can be resumed. The worker runs in its own session, so a Ctrl-C in the
server's terminal reaches it only through `RunManager.shutdown`, once (a second SIGINT
would stop the trainer without a checkpoint).

Live metrics are read back from each run's ``metrics.jsonl`` (the trainer flushes every
row), by `MetricsTail`: what the page sees is what is on disk.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from moelab.errors import ConfigError
from moelab.io import atomic_write_json
from moelab.lab.config import SCALES, LabConfig
from moelab.lab.experiments import EXPERIMENTS
from moelab.playground.config import FieldError, NotFound

logger = logging.getLogger(__name__)

STATE_FILE = "playground.json"
STATES = ("queued", "running", "stopping", "stopped", "done", "failed", "cancelled")
TERMINAL = frozenset({"stopped", "done", "failed", "cancelled"})
INTERRUPTED_EXIT = 130  # the worker's exit status after a cooperative stop

# Playground scales: the lab's, plus "tiny" for a first look (the 3 collapse runs of 40
# steps took 10 s on 2 shared cores, and showed the collapse and both cures); the tests
# set fewer steps. Each scale has the data it trains on: the default corpus, cut to
# `max_chars_per_domain` characters per domain with a `vocab_size` BPE.
SCALE_DATA: dict[str, dict[str, Any]] = {
    "tiny": {"max_chars_per_domain": 20_000, "vocab_size": 512},
    "quick": {},
    "default": {},
}
PLAYGROUND_SCALES: dict[str, LabConfig] = {
    "tiny": SCALES["test"].with_(steps=40),
    "quick": SCALES["quick"],
    "default": SCALES["default"],
}
# The knobs a request may set, per the `LabConfig` field they change.
KNOBS = ("steps", "lr", "seed", "aux_loss_coef", "z_loss_coef", "skew_strength", "bias_update_rate",
         "unstable_lr", "unstable_router_std", "capacity_factors")
# The knobs each experiment reads (the page shows these; any knob is accepted).
EXPERIMENT_KNOBS: dict[str, tuple[str, ...]] = {
    "collapse": ("steps", "lr", "seed", "aux_loss_coef", "skew_strength", "bias_update_rate"),
    "instability": ("steps", "seed", "unstable_lr", "unstable_router_std", "z_loss_coef", "aux_loss_coef"),
    "capacity": ("steps", "lr", "seed", "capacity_factors", "aux_loss_coef"),
}
MAX_STEPS = 5000


@dataclass(frozen=True, kw_only=True)
class BreakRequest:
    """One Break run as the page asks for it: an experiment, a scale and some knobs."""

    experiment: str
    scale: str = "tiny"
    knobs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.experiment not in EXPERIMENTS:
            raise FieldError(f"experiment {self.experiment!r} is unknown; choose one of {', '.join(EXPERIMENTS)}",
                             "experiment")
        if self.scale not in PLAYGROUND_SCALES:
            raise FieldError(f"scale {self.scale!r} is unknown; choose one of {', '.join(PLAYGROUND_SCALES)}",
                             "scale")
        if not isinstance(self.knobs, dict):
            raise FieldError("knobs must be an object of LabConfig fields", "knobs")
        unknown = set(self.knobs) - set(KNOBS)
        if unknown:
            raise FieldError(f"unknown knob(s) {sorted(unknown)}; knobs: {', '.join(KNOBS)}", sorted(unknown)[0])
        steps = self.knobs.get("steps")
        if isinstance(steps, int) and steps > MAX_STEPS:
            raise FieldError(f"steps={steps} is more than the playground's {MAX_STEPS}; use `moelab lab`", "steps")
        self.lab_config()  # validated by LabConfig itself

    def lab_config(self) -> LabConfig:
        """The scale's `LabConfig` with the knobs applied; the library's error names the knob."""
        knobs = dict(self.knobs)
        if "capacity_factors" in knobs:
            cfs = knobs["capacity_factors"]
            if not isinstance(cfs, list | tuple) or not cfs:
                raise FieldError(f"capacity_factors must be a non-empty list of numbers or null, got {cfs!r}",
                                 "capacity_factors")
            knobs["capacity_factors"] = tuple(cfs)
        try:
            return PLAYGROUND_SCALES[self.scale].with_(**knobs)
        except (ConfigError, TypeError) as e:
            name = next((k for k in knobs if f"LabConfig.{k}" in str(e)), None)
            raise FieldError(str(e), name) from None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class Run:
    id: str
    request: BreakRequest
    folder: Path
    state: str = "queued"
    created: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    exit_code: int | None = None
    error: str | None = None
    resume: bool = False
    process: subprocess.Popen | None = None

    def to_dict(self, queue_position: int | None = None) -> dict[str, Any]:
        d = {"id": self.id, "state": self.state, "experiment": self.request.experiment,
             "scale": self.request.scale, "knobs": self.request.knobs, "folder": str(self.folder),
             "created": self.created, "started": self.started, "ended": self.ended,
             "exit_code": self.exit_code, "error": self.error, "queue_position": queue_position,
             "resumable": self.state == "stopped"}
        return d

    def save(self) -> None:
        atomic_write_json(self.folder / STATE_FILE, self.to_dict() | {"request": self.request.to_dict()})


class RunManager:
    """Queue and worker thread for Break runs: one trains, the others wait (first in, first
    out); `max_queue` waiting runs at most."""

    def __init__(self, runs_dir: Path, *, max_queue: int = 8, python: str | None = None) -> None:
        self.runs_dir = runs_dir
        self.max_queue = max_queue
        self.python = python or sys.executable
        self.runs: dict[str, Run] = {}
        self._queue: deque[str] = deque()
        self._lock = threading.Condition()
        self._closing = False
        self._load_existing()
        self._thread = threading.Thread(target=self._loop, name="playground-runs", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ requests

    def submit(self, request: BreakRequest) -> Run:
        with self._lock:
            if self._closing:
                raise ConfigError("the playground is shutting down; no new runs")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} runs already wait (max_queue {self.max_queue}); "
                                "stop one or wait")
            run_id = self._new_id(request.experiment)
            run = Run(run_id, request, self.runs_dir / run_id)
            run.folder.mkdir(parents=True)
            run.save()
            self.runs[run_id] = run
            self._queue.append(run_id)
            self._lock.notify_all()
            logger.info("playground: queued %s (%s, scale %s)", run_id, request.experiment, request.scale)
            return run

    def resume(self, run_id: str) -> Run:
        with self._lock:
            run = self.get(run_id)
            if run.state != "stopped":
                raise FieldError(f"run {run_id} is {run.state}; only a stopped run can be resumed", "id")
            run.state, run.resume, run.exit_code, run.ended = "queued", True, None, None
            run.save()
            self._queue.append(run_id)
            self._lock.notify_all()
            return run

    def stop(self, run_id: str) -> Run:
        """A queued run is cancelled; a running one gets one SIGINT (checkpoint, then exit)."""
        with self._lock:
            run = self.get(run_id)
            if run.state == "queued":
                self._queue.remove(run_id)
                run.state, run.ended = "cancelled", time.time()
                run.save()
            elif run.state == "running" and run.process is not None:
                run.state = "stopping"
                run.save()
                run.process.send_signal(signal.SIGINT)
            return run

    def get(self, run_id: str) -> Run:
        run = self.runs.get(run_id)
        if run is None:
            raise NotFound(f"no run {run_id!r} in this playground")
        return run

    def listing(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r.to_dict(self.queue_position(r.id)) for r in sorted(self.runs.values(), key=lambda r: r.created)]

    def queue_position(self, run_id: str) -> int | None:
        """1 for the next run to start, None for a run not waiting."""
        try:
            return self._queue.index(run_id) + 1
        except ValueError:
            return None

    def shutdown(self, timeout: float = 60.0) -> None:
        """Cancel waiting runs and stop the running one cooperatively (it checkpoints)."""
        with self._lock:
            self._closing = True
            for run_id in list(self._queue):
                self.stop(run_id)
            running = [r for r in self.runs.values() if r.state in ("running", "stopping")]
            for r in running:
                if r.state == "running":
                    self.stop(r.id)
            self._lock.notify_all()
        for r in running:
            if r.process is not None:
                try:
                    r.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    logger.warning("playground: %s did not stop in %.0f s; killing it", r.id, timeout)
                    r.process.kill()
        self._thread.join(timeout)

    # ------------------------------------------------------------------ internals

    def _new_id(self, experiment: str) -> str:
        n = 1 + max((int(p.name.rsplit("-", 1)[1]) for p in self.runs_dir.glob(f"{experiment}-*")
                     if p.name.rsplit("-", 1)[1].isdigit()), default=0)
        return f"{experiment}-{n:03d}"

    def _load_existing(self) -> None:
        """Runs of earlier sessions (their playground.json); one that was training when the
        server died is 'stopped' (its checkpoint, if any, resumes)."""
        if not self.runs_dir.is_dir():
            return
        for state_file in sorted(self.runs_dir.glob(f"*/{STATE_FILE}")):
            try:
                d = json.loads(state_file.read_text(encoding="utf-8"))
                request = BreakRequest(**d["request"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                logger.warning("playground: skipping %s: %s", state_file, e)
                continue
            state = d.get("state", "failed")
            if state in ("queued", "running", "stopping"):
                state = "stopped" if state != "queued" else "cancelled"
            run = Run(d["id"], request, state_file.parent, state=state, created=d.get("created", 0.0),
                      started=d.get("started"), ended=d.get("ended"), exit_code=d.get("exit_code"),
                      error=d.get("error"))
            self.runs[run.id] = run

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closing:
                    self._lock.wait()
                if self._closing:
                    return
                run = self.runs[self._queue.popleft()]
                run.state, run.started = "running", time.time()
                log = open(run.folder / "worker.log", "ab")  # noqa: SIM115 (closed below)
                cmd = [self.python, "-m", "moelab.playground.worker", str(run.folder)] + (
                    ["--resume"] if run.resume else [])
                env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
                           PYTHONPATH=os.pathsep.join(p for p in (_src_root(), os.environ.get("PYTHONPATH")) if p))
                try:
                    run.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                   start_new_session=True)
                except OSError as e:
                    log.close()
                    run.state, run.error, run.ended = "failed", f"could not start the worker: {e}", time.time()
                    run.save()
                    continue
                run.save()
                logger.info("playground: started %s (pid %d)", run.id, run.process.pid)
            code = run.process.wait()
            log.close()
            with self._lock:
                run.exit_code, run.ended = code, time.time()
                if code == 0:
                    run.state = "done"
                elif code == INTERRUPTED_EXIT or run.state == "stopping":
                    run.state = "stopped"
                else:
                    run.state = "failed"
                    run.error = _last_line(run.folder / "worker.log") or f"the worker exited with status {code}"
                run.process = None
                run.save()
                logger.info("playground: %s %s", run.id, run.state)
                self._lock.notify_all()


class QueueFull(ConfigError):
    """Too many runs wait (HTTP 429)."""


def _src_root() -> str:
    """The folder holding the `moelab` package, so the worker imports this very copy."""
    return str(Path(__file__).resolve().parents[2])


def _last_line(path: Path) -> str | None:
    try:
        lines = [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    except OSError:
        return None
    return lines[-1][-500:] if lines else None


# --------------------------------------------------------------------------- live metrics


def point_of(row: dict[str, Any]) -> dict[str, Any]:
    """The figures the page plots from one train row of ``metrics.jsonl``: loss, the busiest
    expert's share and the max router logit (each the max over MoE layers), and each
    expert's share of the assignments over all MoE layers."""
    layers = list((row.get("layers") or {}).values())

    def top(key: str) -> float | None:
        vals = [v[key] for v in layers if isinstance(v.get(key), int | float) and math.isfinite(v[key])]
        return max(vals) if vals else None

    per_expert = [sum(col) for col in zip(*(v.get("tokens_per_expert") or [] for v in layers), strict=False)]
    total = sum(per_expert)
    return {"step": row.get("step"), "loss": row.get("loss"), "busiest_expert_share": top("busiest_expert_share"),
            "max_router_logit": top("max_router_logit"), "dead_experts": sum(int(v.get("dead_experts", 0)) for v in layers),
            "load": [c / total for c in per_expert] if total else []}


class MetricsTail:
    """New complete rows of the ``metrics.jsonl`` files under an experiment folder since the
    last call (a line still being written is left for the next call)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._offsets: dict[Path, int] = {}

    def read(self) -> list[tuple[str, dict[str, Any]]]:
        out = []
        for path in sorted(self.folder.glob("*/metrics.jsonl"), key=lambda p: p.stat().st_mtime_ns):
            start = self._offsets.get(path, 0)
            with path.open("rb") as f:
                f.seek(start)
                chunk = f.read()
            end = chunk.rfind(b"\n") + 1
            self._offsets[path] = start + end
            for line in chunk[:end].splitlines():
                try:
                    out.append((path.parent.name, json.loads(line)))
                except ValueError:
                    continue
        return out


def events_of(rows: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    """SSE events (name, data) for tailed rows: "point" per train row, "eval" per eval row,
    "stop" when the trainer stopped a run (divergence)."""
    out = []
    for run_name, row in rows:
        kind = row.get("kind")
        if kind == "train":
            out.append(("point", {"run": run_name, **point_of(row)}))
        elif kind == "eval":
            out.append(("eval", {"run": run_name, "step": row.get("step"), "val_loss": row.get("val_loss")}))
        elif kind == "stop":
            out.append(("stop", {"run": run_name, "step": row.get("step"), "reason": row.get("reason")}))
    return out


def verdict_of(folder: Path) -> dict[str, Any] | None:
    """The finished experiment's verdict (``experiment.json``): passed, the verdict lines and
    each run's final figures, read generically (whatever the experiment reports)."""
    from moelab.lab.failures import load_experiment

    if not (folder / "experiment.json").is_file():
        return None
    d = load_experiment(folder)
    return {"experiment": d["experiment"], "passed": d.get("passed"), "verdicts": d.get("verdicts", []),
            "num_experts": d.get("num_experts"), "top_k": d.get("top_k"),
            "runs": {name: {k: v for k, v in r.items() if not isinstance(v, dict | list)}
                     for name, r in d.get("runs", {}).items()}}
