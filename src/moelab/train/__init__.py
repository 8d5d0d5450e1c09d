"""Training: the loop (`train`), checkpoints, metrics, and the MoE-vs-dense comparison.

`LoadedModel`, `load_model` and `read_run_config` are `moelab.rundir`'s, re-exported here
for callers that load a trained run from `moelab.train`.
"""

from moelab.rundir import LoadedModel, load_model, read_run_config
from moelab.train.metrics import MetricsWriter, read_metrics
from moelab.train.trainer import (
    TrainConfig,
    TrainingInterrupted,
    TrainResult,
    evaluate,
    lr_at,
    train,
)

__all__ = [
    "LoadedModel",
    "MetricsWriter",
    "TrainConfig",
    "TrainResult",
    "TrainingInterrupted",
    "evaluate",
    "load_model",
    "lr_at",
    "read_metrics",
    "read_run_config",
    "train",
]
