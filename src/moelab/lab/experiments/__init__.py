"""The lab's failure-mode experiments, one module each, and the registry of them by name.

A new experiment is one more module declaring an `Experiment` and one more entry in
`REGISTRY`; the orchestration (`moelab.lab.failures.run_experiment`) does not change.
"""

from __future__ import annotations

from moelab.errors import ConfigError
from moelab.lab.experiments import capacity, collapse, instability
from moelab.lab.experiments.base import Experiment, MetricPlot, RunOutcome, RunSpec, Verdict

# In the order `moelab lab` lists them.
REGISTRY: dict[str, Experiment] = {e.name: e for e in (collapse.EXPERIMENT, instability.EXPERIMENT,
                                                       capacity.EXPERIMENT)}
EXPERIMENTS: tuple[str, ...] = tuple(REGISTRY)


def get_experiment(name: str) -> Experiment:
    """The registered experiment `name`; a `ConfigError` naming the allowed ones otherwise."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown lab experiment {name!r}; choose one of {EXPERIMENTS}") from None


__all__ = ["EXPERIMENTS", "REGISTRY", "Experiment", "MetricPlot", "RunOutcome", "RunSpec", "Verdict",
           "get_experiment"]
