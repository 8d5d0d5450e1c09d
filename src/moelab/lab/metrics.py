"""A run's ``metrics.jsonl`` as the lab reads it: train and eval rows, as series and arrays.

The file has one reader, `moelab.train.metrics.read_metrics` (rows as dicts, a torn last
line skipped); `RunMetrics` is a view of those rows split by kind, with the per-step
series the lab's summaries and plots need.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moelab.errors import DataError
from moelab.train.metrics import METRICS_FILE, read_metrics


@dataclass
class RunMetrics:
    """The rows of one run's ``metrics.jsonl``, split by kind."""

    train: list[dict[str, Any]] = field(default_factory=list)
    eval: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_rows(cls, rows: list[dict[str, Any]]) -> RunMetrics:
        """Split `read_metrics` rows by kind (stop rows are not kept)."""
        out = cls()
        for row in rows:
            if row.get("kind") == "train":
                out.train.append(row)
            elif row.get("kind") == "eval":
                out.eval.append(row)
        return out

    @classmethod
    def from_run(cls, run_dir: str | Path) -> RunMetrics:
        """Read ``RUN_DIR/metrics.jsonl`` (with `read_metrics`)."""
        path = Path(run_dir) / METRICS_FILE
        # Checked here too, for an error that says what a lab caller gave wrongly.
        if not path.is_file():
            raise DataError(f"{path} does not exist: not a moelab run directory (or the run wrote no metrics yet)")
        return cls.from_rows(read_metrics(path))

    @property
    def layers(self) -> list[str]:
        """MoE layer keys (strings, as in the JSON) seen in the train rows, in numeric order."""
        keys: set[str] = set()
        for row in self.train:
            keys.update((row.get("layers") or {}).keys())
        return sorted(keys, key=int)

    def steps(self) -> np.ndarray:
        return np.array([row["step"] for row in self.train], dtype=np.int64)

    def series(self, key: str) -> np.ndarray:
        """A top-level train-row value per step (NaN where missing or null)."""
        return np.array([num(row.get(key)) for row in self.train], dtype=np.float64)

    def layer_series(self, key: str, layer: str) -> np.ndarray:
        """A `RoutingStats` value of one layer per step (NaN where missing)."""
        return np.array([num((row.get("layers") or {}).get(layer, {}).get(key)) for row in self.train])

    def load_matrix(self, layer: str) -> np.ndarray:
        """``[steps, E]`` tokens per expert of one layer (rows of zeros where missing)."""
        rows = [(row.get("layers") or {}).get(layer, {}).get("tokens_per_expert") for row in self.train]
        width = max((len(r) for r in rows if r), default=0)
        return np.array([r if r else [0] * width for r in rows], dtype=np.float64).reshape(len(rows), width)


def num(v: Any) -> float:
    """A JSON value as a float: NaN for null, a missing key or a non-number."""
    try:
        return float(v) if v is not None else float("nan")
    except (TypeError, ValueError):
        return float("nan")
