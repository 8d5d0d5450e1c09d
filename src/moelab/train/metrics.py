"""Training telemetry: `metrics.jsonl` rows, TensorBoard scalars, and reading them back.

`metrics.jsonl` holds one JSON object per line (schema in `docs/train.md`):

* train rows ``{"kind": "train", "step", "loss", "lm_loss", "aux_loss", "z_loss", "lr",
  "grad_norm", "tokens_per_s", "step_time_s", "layers": {"<layer>": RoutingStats.to_dict()}}``
* eval rows ``{"kind": "eval", "step", "val_loss", "val_loss_by_domain": {domain: loss}}``
* one stop row ``{"kind": "stop", "step", "reason"}`` when training stopped early.

The file is an append-only log, the one file moelab does not rewrite atomically: rewriting
it every step would cost O(steps^2). Each row is written with one ``write`` and flushed,
so a kill loses at most a torn last line; `read_metrics` skips such a line, and a resumed
run rewrites the file atomically without it (`truncate_metrics`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import IO, Any

from moelab.errors import DataError
from moelab.io import atomic_write_text

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"


def _clean(value: Any) -> Any:
    """JSON has no NaN/Inf: write non-finite floats as null so every line stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def last_step(path: str | Path) -> int | None:
    """The step of the last complete row of a run's `metrics.jsonl` (a run dir or the
    file), read from its tail only: how far a run training elsewhere has got. None: no
    file or no complete row yet."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - (1 << 16)))
            tail = f.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    for line in reversed(tail.splitlines()):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a row being written, or the cut first line of the tail
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            return row["step"]
    return None


def read_metrics(path: str | Path, *, kind: str | None = None) -> list[dict]:
    """Rows of a `metrics.jsonl` (a run dir or the file), optionally only one `kind`.

    A torn last line (the run was killed mid-write) is skipped with a warning; a malformed
    line elsewhere raises `DataError` naming the file and line.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise DataError(f"metrics file {path} does not exist")
    lines = path.read_text(encoding="utf-8").splitlines()
    rows: list[dict] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                logger.warning("%s: ignoring a torn last line (the run was interrupted)", path)
                break
            raise DataError(f"{path}:{i + 1}: not valid JSON ({e})") from None
        if not isinstance(row, dict) or "kind" not in row or "step" not in row:
            raise DataError(f"{path}:{i + 1}: a metrics row must be an object with 'kind' and 'step'")
        if kind is None or row["kind"] == kind:
            rows.append(row)
    return rows


def truncate_metrics(path: str | Path, after_step: int) -> int:
    """Drop rows with ``step > after_step`` (and stop rows), atomically; returns rows kept.

    Used on resume: the rows the interrupted run wrote after its last checkpoint are
    written again by the resumed run, so the file reads as one uninterrupted run.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    kept = [
        r for r in read_metrics(path)
        if r["step"] <= after_step and r["kind"] != "stop"
    ]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return len(kept)


class MetricsWriter:
    """Appends rows to `metrics.jsonl` and mirrors the scalars to TensorBoard.

    ``tensorboard=False`` skips the event files (tests, benchmarks). ``purge_step`` is the
    resume step: TensorBoard hides events the interrupted run wrote after it.
    """

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True, purge_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")  # noqa: SIM115
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a dependency, but keep training if it is broken
                logger.warning("tensorboard is not importable; writing metrics.jsonl only")
            else:
                self._tb = SummaryWriter(str(self.run_dir / TB_DIR), purge_step=purge_step)

    def write(self, row: dict) -> None:
        self._file.write(json.dumps(_clean(row)) + "\n")
        self._file.flush()
        if self._tb is not None:
            self._to_tensorboard(row)

    def _to_tensorboard(self, row: dict) -> None:
        tb, step, kind = self._tb, row["step"], row["kind"]
        if kind == "train":
            for key in ("loss", "lm_loss", "aux_loss", "z_loss", "lr", "grad_norm", "tokens_per_s"):
                if isinstance(row.get(key), int | float):
                    tb.add_scalar(f"train/{key}", row[key], step)
            for layer, stats in row.get("layers", {}).items():
                for key in ("busiest_expert_share", "load_cv", "dead_experts", "router_entropy",
                            "max_router_logit", "dropped_fraction"):
                    tb.add_scalar(f"routing/layer{layer}/{key}", stats[key], step)
        elif kind == "eval":
            tb.add_scalar("eval/val_loss", row["val_loss"], step)
            for domain, loss in row["val_loss_by_domain"].items():
                tb.add_scalar(f"eval/val_loss_{domain}", loss, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
