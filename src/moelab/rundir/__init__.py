"""Run directories: the one on-disk contract shared by trainer, lab, analysis, HF interop,
generation and accounting.

    config.json            {"format": "moelab-run", "version": 1, "model", "train", "data"[, "source"][, "quant"]
                            [, "sha256": {"model.safetensors": hex}]}   (sha256: runs written by `save_model`)
    model.safetensors      the weights (a tied head stored once); every loader checks its sha256
    tokenizer.json         the tokenizer the run used
    optimizer.safetensors  trainer only: optimizer tensors   (`moelab.train.checkpoint`)
    trainer_state.json     trainer only: step, RNG, sha256s  (`moelab.train.checkpoint`)
    metrics.jsonl, tb/     trainer only: telemetry           (`moelab.train.metrics`)

A quantised run (`moelab.quant.checkpoint`) is the same folder with a "quant" entry in
config.json and quantised expert buffers in model.safetensors; `load_model` refuses it
(load it with `moelab.hf.load_any` or `moelab.quant.load_quantized`).

`files` is torch-free (names, `read_run_config`, `is_run_dir`, `write_run_config`), so
`moelab size` can read a run without importing torch; `weights` holds the torch part
(`model_state`, `load_weights`, `load_model`, `save_model`). Names are imported on first
use (PEP 562), so ``import moelab.rundir`` alone pulls in neither.
"""

from __future__ import annotations

from moelab.lazy import lazy_exports

_EXPORTS = {
    "CONFIG_FILE": "moelab.rundir.files",
    "MODEL_FILE": "moelab.rundir.files",
    "OPTIMIZER_FILE": "moelab.rundir.files",
    "QUANT_KEY": "moelab.rundir.files",
    "QUANT_METADATA_KEY": "moelab.rundir.files",
    "RUN_FORMAT": "moelab.rundir.files",
    "RUN_VERSION": "moelab.rundir.files",
    "SHA256_KEY": "moelab.rundir.files",
    "STATE_FILE": "moelab.rundir.files",
    "TOKENIZER_FILE": "moelab.rundir.files",
    "check_out_dir": "moelab.rundir.files",
    "config_path": "moelab.rundir.files",
    "existing_run_paths": "moelab.rundir.files",
    "is_run_dir": "moelab.rundir.files",
    "model_config_from_run": "moelab.rundir.files",
    "model_config_of": "moelab.rundir.files",
    "quant_of": "moelab.rundir.files",
    "read_run_config": "moelab.rundir.files",
    "recorded_sha256": "moelab.rundir.files",
    "run_dir_of": "moelab.rundir.files",
    "tokenizer_of": "moelab.rundir.files",
    "write_run_config": "moelab.rundir.files",
    "LoadedModel": "moelab.rundir.weights",
    "assign_weights": "moelab.rundir.weights",
    "load_model": "moelab.rundir.weights",
    "load_weights": "moelab.rundir.weights",
    "model_state": "moelab.rundir.weights",
    "read_tensors": "moelab.rundir.weights",
    "save_model": "moelab.rundir.weights",
    "save_safetensors": "moelab.rundir.weights",
    "save_weights": "moelab.rundir.weights",
    "tied_names": "moelab.rundir.weights",
    "verify_weights": "moelab.rundir.weights",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
