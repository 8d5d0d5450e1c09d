"""Training: the loop (`train`), checkpoints and run directories, metrics, and the
MoE-vs-dense comparison."""

from moelab.train.checkpoint import LoadedModel, load_model, read_run_config
from moelab.train.metrics import MetricsWriter, read_metrics
from moelab.train.trainer import TrainConfig, TrainResult, evaluate, lr_at, train

__all__ = [
    "LoadedModel",
    "MetricsWriter",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "load_model",
    "lr_at",
    "read_metrics",
    "read_run_config",
    "train",
]
