"""Failure modes of MoE training, each as a small paired experiment (broken vs cured):
the shared orchestration.

Every experiment trains a few runs of the same small model on the same data with the
same seed, differing only in the setting under test, then reads the per-step routing
telemetry back from each run's ``metrics.jsonl`` and gives a verdict. What each
experiment is (its runs, the figures its verdict reads, its plots) lives in one module
per failure mode under `moelab.lab.experiments` (``collapse``, ``instability``,
``capacity``), looked up by name in `moelab.lab.experiments.REGISTRY`; this module
trains the runs (`train_run`), summarises them (`moelab.lab.run_summary`) and writes the
result.

`run_experiment` returns an `ExperimentResult`; it writes ``experiment.json`` and the PNG
plots in the experiment folder, and every run keeps its own run directory (the shared
run-directory contract), so the plots can be redrawn from disk.

The names the CLI, the demo, the benchmarks and the tests import from here before the
experiments had their own modules (`LabConfig`, `SCALES`, `RunSpec`, `skew_router`, ...)
are re-exported.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from moelab.errors import ConfigError, DataError
from moelab.io import atomic_write_json
from moelab.lab import plots
from moelab.lab.config import SCALES, LabConfig
from moelab.lab.experiments import EXPERIMENTS, REGISTRY, RunOutcome, RunSpec, get_experiment
from moelab.lab.experiments.collapse import skew_router
from moelab.lab.experiments.instability import bf16_routing_flips, scale_router_init
from moelab.lab.metrics import RunMetrics
from moelab.lab.run_summary import RunSummary, count_spikes, summarize_run
from moelab.model import Transformer
from moelab.moe import NonFiniteRouterError
from moelab.train.workers import plan_workers, run_parallel

__all__ = [
    "EXPERIMENTS", "REGISTRY", "RESULT_FORMAT", "SCALES", "ExperimentResult", "LabConfig", "RunOutcome",
    "RunSpec", "RunSummary", "bf16_routing_flips", "count_spikes", "draw_experiment_plots", "experiment_runs",
    "load_experiment", "run_experiment", "scale_router_init", "skew_router", "summarize_run", "train_run",
    "verdict_table",
]

logger = logging.getLogger(__name__)

RESULT_FORMAT = "moelab-lab"


@dataclass
class ExperimentResult:
    """What `run_experiment` returns: each run's summary and the verdict; `to_dict()` is
    ``experiment.json``."""

    experiment: str
    runs: dict[str, RunSummary]
    verdicts: list[str]
    plots: dict[str, str]  # name -> path
    out_dir: str
    num_experts: int
    top_k: int
    config: dict[str, Any] = field(default_factory=dict)
    passed: bool = True  # every claimed effect was seen
    rules: dict[int, bool] = field(default_factory=dict)  # the verdict's numbered rules -> held

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": RESULT_FORMAT,
            "version": 1,
            "experiment": self.experiment,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "uniform_share": 1.0 / self.num_experts,
            "passed": self.passed,
            "rules": {str(k): v for k, v in self.rules.items()},
            "verdicts": self.verdicts,
            "runs": {name: r.to_dict() for name, r in self.runs.items()},
            "plots": self.plots,
            "out_dir": self.out_dir,
            "config": self.config,
        }

    def json_summary(self) -> dict[str, Any]:
        """The `moelab lab --json` object: final values per run, with the measured costs
        of its routing (collapse: ``dropped_at_capacity`` at ``drop_capacity_factor``,
        ``ep_step_factor`` per EP size, ``effective_experts``; null where not measured)."""
        keys = ("busiest_expert_share", "load_cv", "dead_experts", "dropped_fraction", "max_router_logit",
                "peak_router_logit", "initial_router_logit", "loss_spikes", "nan_steps", "val_loss", "steps_done",
                "stopped_reason", "bf16_routing_flips", "drop_capacity_factor", "dropped_at_capacity",
                "ep_step_factor", "effective_experts", "settings", "run_dir", "description")
        return {
            "experiment": self.experiment,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "passed": self.passed,
            "rules": {str(k): v for k, v in self.rules.items()},
            "verdicts": self.verdicts,
            "runs": {name: {k: getattr(r, k) for k in keys} | {"per_layer": r.per_layer}
                     for name, r in self.runs.items()},
            "plots": self.plots,
        }


def experiment_runs(experiment: str, cfg: LabConfig, vocab_size: int) -> list[RunSpec]:
    """The paired runs of `experiment` (same seed and data; the broken one first)."""
    return get_experiment(experiment).runs(cfg, vocab_size)


# --------------------------------------------------------------------------- running


def train_run(spec: RunSpec, cfg: LabConfig, data: Any, run_dir: Path, progress: bool,
              resume: bool = False) -> RunOutcome:
    """Train one run through `moelab.train.train` from a model prepared by `spec`.

    A run that diverges is stopped (by the trainer, or here when it fails outside a
    training step) and its outcome says why; it is never raised. ``resume=True``: a run
    with a checkpoint (finished, or interrupted by Ctrl-C) continues from it, a finished
    one is read back with its weights, not retrained; any other run starts again.
    """
    from moelab.rundir import MODEL_FILE, STATE_FILE, load_weights
    from moelab.train import TrainConfig, train

    torch.manual_seed(cfg.seed)
    model = Transformer(spec.model_cfg)
    if spec.prepare is not None:
        spec.prepare(model)
    train_cfg = TrainConfig(
        steps=cfg.steps, batch_size=cfg.batch_size, seq_len=cfg.seq_len, lr=spec.lr, seed=cfg.seed,
        warmup_steps=max(1, cfg.steps // 10), eval_interval=cfg.eval_every, eval_batches=cfg.eval_batches,
        checkpoint_interval=0, log_interval=max(1, cfg.steps // 20),
    )
    # TensorBoard off: the lab reads metrics.jsonl, and event files cost time on short runs.
    try:
        if resume and (run_dir / STATE_FILE).is_file():
            result = train(spec.model_cfg, train_cfg, data, run_dir, progress=progress, model=model,
                           tensorboard=False, resume=True)
            if result.already_done:  # kept as it is; the measurements need its trained weights
                load_weights(model, run_dir / MODEL_FILE)
        else:
            result = train(spec.model_cfg, train_cfg, data, run_dir, progress=progress, model=model,
                           tensorboard=False, overwrite=True)
        steps_done, nan_steps, stopped = result.steps_done, result.nan_steps, result.stopped_reason
        # A run stopped on NaN has no trained model to evaluate: its last evaluation is
        # from before the divergence (often step 0), so report no val loss at all.
        val_loss = None if stopped else result.val_loss
    except (NonFiniteRouterError, FloatingPointError) as e:
        # The trainer stops cleanly on a non-finite training step; a model that is already
        # broken can also fail in an evaluation pass (e.g. the one at step 0). Same verdict.
        done = _train_rows(run_dir)
        logger.warning("%s diverged outside a training step: %s", spec.name, e)
        steps_done, nan_steps, stopped = int(done[-1]["step"]) if done else 0, 1, f"diverged: {e}"
        val_loss = None
    return RunOutcome(name=spec.name, run_dir=run_dir, metrics=RunMetrics.from_run(run_dir), steps_done=steps_done,
                      nan_steps=nan_steps, val_loss=val_loss, stopped_reason=stopped, model=model)


def _train_and_measure(exp: Any, spec: RunSpec, cfg: LabConfig, data: Any, run_dir: Path, progress: bool,
                       resume: bool) -> tuple[RunOutcome, dict[str, Any]]:
    """One run trained, and the experiment's measurements of its trained model."""
    logger.info("lab %s: run %s (%s)", exp.name, spec.name, spec.description)
    run = train_run(spec, cfg, data, run_dir, progress, resume=resume)
    return run, (exp.measure(run.model, data, cfg) if run.finished else {})


def _lab_run_in_worker(experiment: str, cfg: LabConfig, name: str, cache_entry: str, run_dir: str,
                       resume: bool) -> tuple[RunOutcome, dict[str, Any]]:
    from moelab.data import load_cache_entry

    data = load_cache_entry(cache_entry)
    exp = get_experiment(experiment)
    spec = next(s for s in exp.runs(cfg, data.vocab_size) if s.name == name)
    run, measured = _train_and_measure(exp, spec, cfg, data, Path(run_dir), False, resume)
    return replace(run, model=None), measured  # the model stays here: the parent needs only its figures


def _train_rows(run_dir: Path) -> list[dict[str, Any]]:
    try:
        return RunMetrics.from_run(run_dir).train
    except DataError:
        return []


def run_experiment(
    experiment: str,
    data: Any,
    out_dir: str | Path,
    *,
    config: LabConfig | None = None,
    progress: bool = True,
    only: Sequence[str] | None = None,
    resume: bool = False,
    workers: int | None = 1,
    threads: int | None = None,
) -> ExperimentResult:
    """Run the paired runs of `experiment`, summarise them, write plots and ``experiment.json``.

    `data` is a `moelab.data.PreparedData`; each run goes to ``out_dir/<run name>/``
    (a full run directory). `only` restricts to some run names (tests, the demo).
    A run that diverges is stopped by the trainer and reported, never raised.
    ``resume=True`` keeps the finished runs of an interrupted experiment (`train_run`).
    ``workers``: train the runs side by side in that many processes (`moelab.train.workers`;
    ``None``: one per core) of an equal share of `threads`; ``1``: one after the other here.
    """
    exp = get_experiment(experiment)
    cfg = config or LabConfig()
    out = Path(out_dir)
    specs = exp.runs(cfg, data.vocab_size)
    if only:
        unknown = set(only) - {s.name for s in specs}
        if unknown:
            raise ConfigError(f"unknown run(s) {sorted(unknown)} for {experiment}; runs are {[s.name for s in specs]}")
        specs = [s for s in specs if s.name in only]
    n_workers, threads = plan_workers(len(specs), workers, threads)
    if n_workers == 1:
        outcomes = [_train_and_measure(exp, spec, cfg, data, out / spec.name, progress, resume) for spec in specs]
    else:
        logger.info("lab %s: %d runs in %d worker processes of %d thread(s)", experiment, len(specs), n_workers,
                    threads)
        outcomes = run_parallel(_lab_run_in_worker, [(experiment, cfg, spec.name, str(data.cache_dir),
                                                      str(out / spec.name), resume) for spec in specs],
                                workers=n_workers, threads=threads, names=[spec.name for spec in specs])
    summaries: dict[str, RunSummary] = {}
    metrics: dict[str, RunMetrics] = {}
    for spec, (run, measured) in zip(specs, outcomes, strict=True):
        metrics[spec.name] = run.metrics
        summary = summarize_run(
            spec.name, run.metrics, run_dir=run.run_dir, description=spec.description, val_loss=run.val_loss,
            nan_steps=run.nan_steps, stopped_reason=run.stopped_reason, steps_done=run.steps_done,
            spike_factor=cfg.spike_factor, settings=spec.settings,
        )
        summaries[spec.name] = replace(summary, **measured)
    verdict = exp.verdict(summaries, cfg.num_experts)
    result = ExperimentResult(
        experiment=experiment, runs=summaries, verdicts=verdict.lines, plots={}, out_dir=str(out),
        num_experts=cfg.num_experts, top_k=cfg.top_k, config=cfg.to_dict(), passed=verdict.passed,
        rules=verdict.rules,
    )
    made = draw_experiment_plots(experiment, metrics, out, cfg.num_experts) | exp.summary_plots(
        summaries, out / "plots", cfg.num_experts)
    result.plots = {k: str(v) for k, v in made.items()}
    atomic_write_json(out / "experiment.json", result.to_dict())
    return result


def draw_experiment_plots(experiment: str, metrics: dict[str, RunMetrics], out: Path, num_experts: int) -> dict[str, Path]:
    """The experiment's plots from its runs' metrics (also used to redraw from disk): the
    loss curves, the experiment's own `MetricPlot`s, then each run's expert load."""
    p = out / "plots"
    uniform = 1.0 / num_experts
    made: dict[str, Path] = {
        "loss": plots.plot_training_curves(metrics, p / "loss.png", title=f"{experiment}: training loss"),
    }
    for mp in get_experiment(experiment).plots:
        made[mp.name] = plots.plot_lab_metric(
            metrics, mp.key, p / mp.file, reduce=mp.reduce, per_layer=mp.per_layer, ylabel=mp.ylabel,
            hline=uniform if mp.uniform_line else None, hline_label="uniform 1/E" if mp.uniform_line else "",
            log=mp.log, title=mp.title)
    for name, m in metrics.items():
        if m.layers:
            made[f"load_{name}"] = plots.plot_expert_load(m, p / f"expert_load_{name}.png",
                                                          title=f"{experiment} / {name}: expert load")
    return made


def load_experiment(path: str | Path) -> dict[str, Any]:
    """Read an ``experiment.json`` (a file or the experiment folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / "experiment.json"
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path} does not exist: not a lab experiment folder") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON: {e}") from e
    if d.get("format") != RESULT_FORMAT:
        raise DataError(f"{path} is not a moelab lab result (format {d.get('format')!r})")
    return d


def verdict_table(result: ExperimentResult | dict[str, Any]) -> str:
    """A text table of the final figures of each run (what `moelab lab` prints)."""
    d = result.to_dict() if isinstance(result, ExperimentResult) else result
    E = d["num_experts"]
    head = ["run", "busiest", "x1/E", "load CV", "dead", "dropped", "max logit", "spikes", "NaN", "val loss"]
    # The measured routing costs (collapse), as columns only when some run has them.
    eps = sorted({k for r in d["runs"].values() for k in (r.get("ep_step_factor") or {})}, key=int)
    cfs = {r.get("drop_capacity_factor") for r in d["runs"].values()} - {None}
    costs = bool(eps or cfs)
    if costs:
        head += [f"drop@{'/'.join(f'{c:g}' for c in sorted(cfs))}", *(f"EP{k} x" for k in eps), "eff. experts"]

    def f(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    rows = []
    for name, r in d["runs"].items():
        share = r.get("busiest_expert_share")
        row = [name, f(share, ".3f"), f(share * E if share is not None else None, ".1f"), f(r.get("load_cv"), ".2f"),
               f(r.get("dead_experts"), "d"), f(r.get("dropped_fraction"), ".1%"),
               f(r.get("max_router_logit"), ".1f"), f(r.get("loss_spikes"), "d"), f(r.get("nan_steps"), "d"),
               f(r.get("val_loss"), ".3f")]
        if costs:
            row += [f(r.get("dropped_at_capacity"), ".1%"),
                    *(f((r.get("ep_step_factor") or {}).get(k), ".2f") for k in eps), f(r.get("effective_experts"), ".1f")]
        rows.append(row)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])
