"""Run directories: the one on-disk contract shared by trainer, lab, analysis, HF interop,
generation and accounting.

    config.json            {"format": "moelab-run", "version": 1, "model", "train", "data"[, "source"]}
    model.safetensors      the weights (a tied head stored once)
    tokenizer.json         the tokenizer the run used
    optimizer.safetensors  trainer only: optimizer tensors   (`moelab.train.checkpoint`)
    trainer_state.json     trainer only: step, RNG, sha256s  (`moelab.train.checkpoint`)
    metrics.jsonl, tb/     trainer only: telemetry           (`moelab.train.metrics`)

`files` is torch-free (names, `read_run_config`, `is_run_dir`, `write_run_config`), so
`moelab size` can read a run without importing torch; `weights` holds the torch part
(`model_state`, `load_weights`, `load_model`, `save_model`). Names are imported on first
use (PEP 562), so ``import moelab.rundir`` alone pulls in neither.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CONFIG_FILE": "files",
    "MODEL_FILE": "files",
    "OPTIMIZER_FILE": "files",
    "RUN_FORMAT": "files",
    "RUN_VERSION": "files",
    "STATE_FILE": "files",
    "TOKENIZER_FILE": "files",
    "config_path": "files",
    "is_run_dir": "files",
    "model_config_from_run": "files",
    "model_config_of": "files",
    "read_run_config": "files",
    "run_dir_of": "files",
    "tokenizer_of": "files",
    "write_run_config": "files",
    "LoadedModel": "weights",
    "load_model": "weights",
    "load_weights": "weights",
    "model_state": "weights",
    "read_tensors": "weights",
    "save_model": "weights",
    "save_weights": "weights",
    "tied_names": "weights",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
