"""The experiment registry: every experiment declares its runs, what it reads, its plots and
a verdict; names are looked up in one place, with an error that names the allowed ones."""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch

from moelab.errors import ConfigError
from moelab.lab.config import SCALES
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


def collapse_runs(**changes: dict) -> dict[str, RunSummary]:
    """The collapse experiment's runs as a finished experiment that shows the lesson: the
    broken run collapsed, drops and stalls EP far more than the balanced cures, ends behind
    them and next to the dense twin; the aux-free bias balances more cheaply than the aux
    loss. `changes` maps run name -> figures to change."""
    def curve(end: float) -> list[list[float]]:  # falls from 9 to `end`; the collapsed one is ahead early
        return [[s, end + (9 - end) * (1 - s / 100) ** 2] for s in range(0, 101, 20)]

    costs = lambda drop, ep8, eff: dict(dropped_at_capacity=drop, drop_capacity_factor=1.25,  # noqa: E731
                                        ep_step_factor={"2": min(2.0, ep8), "4": min(4.0, ep8), "8": ep8},
                                        effective_experts=eff)
    specs = {r.name: r for r in REGISTRY["collapse"].runs(SCALES["test"], 512)}
    figures = {
        "broken-no-aux": dict(busiest_expert_share=0.5, dead_experts=6, val_loss=4.70, **costs(0.66, 4.0, 2.0),
                              val_curve=[[s, 4.70 + (9 - 4.70) * (1 - s / 100) ** 3] for s in range(0, 101, 20)]),
        "aux-loss": dict(busiest_expert_share=0.15, val_loss=4.60, **costs(0.05, 1.2, 7.8)),
        "aux-free-bias": dict(busiest_expert_share=0.14, val_loss=4.50, **costs(0.02, 1.1, 7.9)),
        "dense-active": dict(busiest_expert_share=None, load_cv=None, dead_experts=None, val_loss=4.68),
        "aux-loss-0.001": dict(busiest_expert_share=0.3, val_loss=4.65, **costs(0.3, 2.4, 5.0)),
        "aux-loss-0.1": dict(busiest_expert_share=0.13, val_loss=4.90, **costs(0.01, 1.05, 8.0)),
        "unskewed-no-aux": dict(busiest_expert_share=0.45, dead_experts=2, val_loss=4.68, **costs(0.6, 3.6, 2.4)),
        "unskewed-aux-loss": dict(busiest_expert_share=0.14, val_loss=4.55, **costs(0.03, 1.1, 7.9)),
    }
    assert set(figures) == set(specs)
    runs = {}
    for name, fig in figures.items():
        fig = {"val_curve": curve(fig["val_loss"])} | fig | changes.get(name, {})
        runs[name] = summary(name, settings=specs[name].settings, **fig)
    return runs


def test_collapse_verdict_passes_when_collapse_its_costs_and_the_cures_costs_are_shown() -> None:
    v = REGISTRY["collapse"].verdict(collapse_runs(), 8)
    assert v.passed, v.lines
    text = "\n".join(v.lines)
    assert "COLLAPSED" in v.lines[0] and "balanced" in v.lines[1]
    assert "66.0%" in text and "EP=8 x4.00" in text  # the costs, measured, are stated
    assert "passes the collapsed one at step" in text
    assert "the aux-free bias is the cheaper cure" in text


def test_collapse_verdict_fails_when_the_cure_does_not_balance() -> None:
    runs = collapse_runs(**{"aux-loss": dict(busiest_expert_share=0.45, dead_experts=1)})
    v = REGISTRY["collapse"].verdict(runs, 8)
    assert not v.passed
    assert any("NOT: aux-loss" in line for line in v.lines)


@pytest.mark.parametrize("field", ["dropped_at_capacity", "ep_step_factor", "effective_experts", "val_loss"])
def test_collapse_verdict_fails_when_a_cost_is_not_measured(field: str) -> None:
    runs = collapse_runs(**{"broken-no-aux": {field: None}})
    v = REGISTRY["collapse"].verdict(runs, 8)
    assert not v.passed
    assert any(f"costs NOT measured: broken-no-aux lacks {field}" in line for line in v.lines)


@pytest.mark.parametrize(("changes", "says", "rule"), [
    # The collapsed run still has the best loss at the horizon: the capacity cost is not shown.
    ({"broken-no-aux": dict(val_loss=4.40)}, "the collapsed run is still ahead", 5),
    # A collapsed router that drops no more than the cure: no system cost shown.
    ({"broken-no-aux": dict(dropped_at_capacity=0.01)}, "does NOT clearly cost", 4),
    # The dense twin is as good as the balanced MoE: the collapsed one is the odd one out.
    ({"dense-active": dict(val_loss=4.45)}, "NOT nearer to it", 6),
    # The aux loss balances more cheaply than the aux-free bias.
    ({"aux-loss": dict(val_loss=4.45)}, "the aux-free bias is NOT cheaper", 7),
    # Without the dense twin there is nothing to compare the collapsed MoE with.
    ({"dense-active": dict(val_loss=None)}, "dense-active NOT run", 6),
])
def test_collapse_verdict_fails_each_lesson_it_does_not_see(changes: dict, says: str, rule: int) -> None:
    v = REGISTRY["collapse"].verdict(collapse_runs(**changes), 8)
    assert not v.passed
    assert any(says in line for line in v.lines), v.lines
    # The failed rule is marked (what the demo's summary line reads); the others are judged too.
    assert v.rules[rule] is False and set(v.rules) == set(range(1, 8)) and v.rules[1] and v.rules[3]


def test_the_demo_says_which_lessons_its_scale_shows() -> None:
    from moelab.lab.demo import collapse_summary
    from moelab.lab.failures import ExperimentResult

    def result(v):
        return ExperimentResult(experiment="collapse", runs={}, verdicts=v.lines, plots={}, out_dir="", num_experts=8,
                                top_k=2, passed=v.passed, rules=v.rules)

    assert collapse_summary(result(REGISTRY["collapse"].verdict(collapse_runs(), 8))).startswith("every lesson")
    short = collapse_summary(result(REGISTRY["collapse"].verdict(collapse_runs(
        **{"broken-no-aux": dict(val_loss=4.40)}), 8)))
    assert "NOT shown: [5] collapse wastes capacity" in short and "--scale long" in short
    assert "[4] collapse costs the system" in short.split("NOT shown")[0]


def test_instability_probe_is_reported_not_paired() -> None:
    settings = {r.name: r.settings for r in REGISTRY["instability"].runs(SCALES["test"], 512)}
    grown = dict(initial_router_logit=10.0, max_router_logit=30.0)
    runs = {"broken-no-zloss": summary("broken-no-zloss", settings=settings["broken-no-zloss"], **grown),
            "probe-big-init": summary("probe-big-init", settings=settings["probe-big-init"], loss_spikes=3),
            "z-loss": summary("z-loss", settings=settings["z-loss"], initial_router_logit=10.0, max_router_logit=8.0)}
    v = REGISTRY["instability"].verdict(runs, 8)
    assert v.passed  # the probe's logits did not grow, and it is not asked to
    assert any("probe-big-init" in line and "it SPIKED" in line for line in v.lines)
    assert not any(line.startswith("probe-big-init vs") for line in v.lines)


def test_unknown_experiment_is_a_config_error_naming_the_allowed_ones(data, tmp_path) -> None:
    for call in (lambda: get_experiment("melt"), lambda: run_experiment("melt", data, tmp_path, progress=False)):
        with pytest.raises(ConfigError, match="unknown lab experiment 'melt'") as err:
            call()
        assert all(name in str(err.value) for name in EXPERIMENTS)
    assert list(tmp_path.iterdir()) == []  # refused before anything was written
