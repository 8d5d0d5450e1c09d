"""What a lab experiment is: its runs (`RunSpec`), the plots it draws (`MetricPlot`), its
verdict (`Verdict`) and what one run produced (`RunOutcome`), bundled as an `Experiment`.

An experiment module (`collapse`, `instability`, `capacity`) is pure description: the
orchestration in `moelab.lab.failures` trains the runs, summarises them (`RunSummary`)
and hands the summaries to the experiment's verdict.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moelab.lab.config import LabConfig
from moelab.lab.metrics import RunMetrics
from moelab.lab.run_summary import RunSummary
from moelab.model import ModelConfig, Transformer


@dataclass(frozen=True)
class RunSpec:
    """One run of an experiment: its model config, lr and how to initialise it."""

    name: str
    description: str
    model_cfg: ModelConfig
    lr: float
    prepare: Callable[[Transformer], None] | None = None
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class RunOutcome:
    """What training one run produced, before it is summarised.

    ``stopped_reason`` is the error, if any: the run diverged (a non-finite loss or router
    output) and was stopped, never raised. ``val_loss`` is the trained model's last
    evaluation; None when the run stopped, since its last evaluation predates the divergence.
    """

    name: str
    run_dir: Path
    metrics: RunMetrics
    steps_done: int
    nan_steps: int
    val_loss: float | None
    stopped_reason: str | None
    model: Transformer = field(repr=False)

    @property
    def finished(self) -> bool:
        """Trained to the last step (a diverged run's model is not measured)."""
        return not self.stopped_reason


@dataclass(frozen=True, kw_only=True)
class MetricPlot:
    """One per-step routing-telemetry plot (a `plots.plot_lab_metric` call) over the runs."""

    name: str  # key in `ExperimentResult.plots`
    key: str  # the metrics.jsonl field (a `RoutingStats` field of each layer)
    file: str  # PNG name under the experiment's plots/
    reduce: str = "max"  # over layers per step: "max", "mean" or "sum"
    ylabel: str
    title: str
    per_layer: bool = False
    log: bool = False
    uniform_line: bool = False  # a dotted line at 1/E


@dataclass(frozen=True)
class Verdict:
    """The experiment's reading of its runs: one line per finding, and whether every
    claimed effect was seen."""

    lines: list[str]
    passed: bool
    rules: dict[int, bool] = field(default_factory=dict)  # numbered rules -> held (collapse's verdict)


def no_measurements(model: Transformer, data: Any, cfg: LabConfig) -> dict[str, Any]:
    return {}


def no_summary_plots(runs: Mapping[str, RunSummary], out: Path, num_experts: int) -> dict[str, Path]:
    return {}


@dataclass(frozen=True, kw_only=True)
class Experiment:
    """A failure mode as a paired experiment (broken vs cured).

    `runs` gives the runs (the broken ones first, named ``broken-...``); `verdict` reads
    the `RunSummary` fields named in `reads`; `plots` are drawn besides the loss curves
    and per-run expert load; `measure` runs on each finished run's trained model and
    returns extra `RunSummary` fields (an empty dict for most experiments);
    `summary_plots(summaries, plots_dir, num_experts)` draws plots of the final figures
    (name -> path).
    """

    name: str
    runs: Callable[[LabConfig, int], list[RunSpec]]  # (cfg, vocab_size) -> runs
    verdict: Callable[[Mapping[str, RunSummary], int], Verdict]  # (summaries, num_experts)
    reads: tuple[str, ...]
    plots: tuple[MetricPlot, ...] = ()
    measure: Callable[[Transformer, Any, LabConfig], dict[str, Any]] = no_measurements
    summary_plots: Callable[[Mapping[str, RunSummary], Path, int], dict[str, Path]] = no_summary_plots
