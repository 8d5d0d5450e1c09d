"""The experiment registry: every experiment declares its runs, what it reads, its plots and
a verdict; names are looked up in one place, with an error that names the allowed ones."""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch

from moelab.errors import ConfigError
from moelab.lab.experiments import (
    EXPERIMENTS,
    REGISTRY,
    Experiment,
    RunSpec,
    Verdict,
    get_experiment,
)
from moelab.lab.failures import experiment_runs, run_experiment
from moelab.lab.run_summary import RunSummary
from moelab.model import Transformer

SUMMARY_FIELDS = {f.name for f in fields(RunSummary)}


def summary(name: str, **figures) -> RunSummary:
    """A `RunSummary` with plain finite figures (what a finished, healthy run gives)."""
    base = dict(
        name=name, description="", run_dir="", steps_done=10, stopped_reason=None, busiest_expert_share=0.2,
        load_cv=0.1, dead_experts=0, dropped_fraction=0.0, max_router_logit=2.0, peak_router_logit=2.0,
        initial_router_logit=1.0, loss_spikes=0, nan_steps=0, val_loss=5.0, final_train_loss=5.0,
    )
    return RunSummary(**(base | figures))


def test_registry_lists_the_cli_experiments_in_order() -> None:
    assert EXPERIMENTS == ("collapse", "instability", "capacity")
    for name, exp in REGISTRY.items():
        assert isinstance(exp, Experiment) and exp.name == name
        assert get_experiment(name) is exp


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_declares_runs_reads_and_plots(name: str, lab_cfg) -> None:
    exp = REGISTRY[name]
    runs = exp.runs(lab_cfg, 512)
    assert runs and all(isinstance(r, RunSpec) for r in runs)
    names = [r.name for r in runs]
    assert len(set(names)) == len(names)
    assert names[0].startswith("broken-")  # the broken run first
    assert any(not n.startswith("broken-") for n in names)  # and a cure (or the baseline) beside it
    assert [r.name for r in experiment_runs(name, lab_cfg, 512)] == names
    assert exp.reads and set(exp.reads) <= SUMMARY_FIELDS, set(exp.reads) - SUMMARY_FIELDS
    assert len({p.name for p in exp.plots}) == len(exp.plots)
    assert not {p.name for p in exp.plots} & {"loss"}  # drawn for every experiment already


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_plots_read_fields_that_the_metrics_rows_have(name: str, lab_cfg) -> None:
    torch.manual_seed(0)
    model = Transformer(lab_cfg.model_config(512))
    stats = model(torch.randint(0, 512, (2, 16))).layer_stats
    row_keys = set(next(iter(stats.values())).to_dict())
    for plot in REGISTRY[name].plots:
        assert plot.key in row_keys
        assert plot.reduce in ("max", "mean", "sum")


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_verdict_reads_summaries_and_returns_lines_and_a_flag(name: str, lab_cfg) -> None:
    exp = REGISTRY[name]
    runs = {r.name: summary(r.name, settings=r.settings) for r in exp.runs(lab_cfg, 512)}
    v = exp.verdict(runs, lab_cfg.num_experts)
    assert isinstance(v, Verdict) and isinstance(v.passed, bool)
    assert v.lines and all(isinstance(line, str) for line in v.lines)
    # Identical healthy runs show no effect of the broken setting: no verdict may pass them.
    assert not v.passed


def test_collapse_verdict_passes_when_the_broken_run_collapsed_and_the_cures_did_not() -> None:
    E = 8
    runs = {"broken-no-aux": summary("broken-no-aux", busiest_expert_share=0.5, dead_experts=3),
            "aux-loss": summary("aux-loss", busiest_expert_share=0.14, dead_experts=0)}
    v = REGISTRY["collapse"].verdict(runs, E)
    assert v.passed and "COLLAPSED" in v.lines[0] and "balanced" in v.lines[1]
    runs["aux-loss"] = summary("aux-loss", busiest_expert_share=0.45, dead_experts=1)
    assert not REGISTRY["collapse"].verdict(runs, E).passed


def test_unknown_experiment_is_a_config_error_naming_the_allowed_ones(data, tmp_path) -> None:
    for call in (lambda: get_experiment("melt"), lambda: run_experiment("melt", data, tmp_path, progress=False)):
        with pytest.raises(ConfigError, match="unknown lab experiment 'melt'") as err:
            call()
        assert all(name in str(err.value) for name in EXPERIMENTS)
    assert list(tmp_path.iterdir()) == []  # refused before anything was written
