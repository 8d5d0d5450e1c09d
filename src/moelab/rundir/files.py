"""The run directory on disk, without torch: file names, `config.json`, detection.

`read_run_config` is the one reader of a run's ``config.json``: the trainer's resume, the
model loader, HF interop, the lab report and `moelab size` all call it, so every one of
them raises the same `CheckpointError` with the same message for a missing file, bad
JSON, a wrong format, an unsupported version or a missing "model" entry.

Accounting (`moelab size`) imports this module, so it must stay free of torch: only
`moelab.errors`, `moelab.io` and the torch-free `moelab.model.config`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moelab.errors import CheckpointError, ConfigError
from moelab.io import atomic_write_json
from moelab.model.config import ModelConfig

RUN_FORMAT = "moelab-run"
RUN_VERSION = 1
CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
TOKENIZER_FILE = "tokenizer.json"
# A quantised run (`moelab.quant.checkpoint`) carries this top-level config entry, and its
# model.safetensors this metadata key; `moelab.rundir.load_model` refuses such a run.
QUANT_KEY = "quant"
QUANT_METADATA_KEY = "moelab_quant"
# The sha256 of model.safetensors: in trainer_state.json (trained runs, with the optimizer's)
# or in config.json (runs written by `save_model`: converted, quantised), under this key.
SHA256_KEY = "sha256"
# Everything moelab itself writes into a run folder: the trainer's files (metrics.jsonl, tb/
# are `moelab.train.metrics`'), and `moelab analyze`'s. `train --overwrite` replaces a folder
# holding only these (and dot-files, temporaries); anything else is a user's, never removed.
RUN_DIR_NAMES = frozenset({CONFIG_FILE, MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, TOKENIZER_FILE, "metrics.jsonl",
                           "tb", "analysis.json", "analysis.html", "plots"})


def run_dir_of(path: str | Path) -> Path:
    """The run directory of `path`: the folder itself, or the folder of a file in it
    (its ``config.json`` or ``model.safetensors``)."""
    path = Path(path)
    return path.parent if path.suffix in (".json", ".safetensors") else path


def existing_run_paths(path: str | Path) -> tuple[Path, Path]:
    """``(run directory, weights file)`` of `path` (a run folder or its
    ``model.safetensors``); a missing folder is a `CheckpointError`."""
    path = Path(path)
    run_dir = run_dir_of(path)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    return run_dir, (path if path.suffix == ".safetensors" else run_dir / MODEL_FILE)


def config_path(path: str | Path) -> Path:
    """The ``config.json`` that describes `path` (a run dir, its weights or the file itself)."""
    path = Path(path)
    if path.suffix == ".json":
        return path
    return run_dir_of(path) / CONFIG_FILE


def _claims_run_format(raw: Any) -> bool:
    return isinstance(raw, dict) and str(raw.get("format", "")).startswith("moelab")


def is_run_dir(path: str | Path) -> bool:
    """Whether `path` (a folder, its ``model.safetensors`` or a config file) is meant as a
    moelab run: its config is a JSON object whose "format" names moelab.

    A cheap test for readers that also accept other folders (`hf.load_any`, `moelab size`);
    it does not validate: `read_run_config` then raises the one error for a broken run.
    """
    try:
        raw = json.loads(config_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return _claims_run_format(raw)


def read_run_config(path: str | Path) -> dict:
    """The parsed ``config.json`` of a run (`path`: the run dir, a file in it, or the
    config file), checked for format, version and a "model" entry."""
    cfg_path = config_path(path)
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path} does not exist: {run_dir_of(path)} is not a moelab run directory")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e}); the run config is corrupt") from None
    if not isinstance(cfg, dict) or cfg.get("format") != RUN_FORMAT:
        raise CheckpointError(f"{cfg_path}: expected an object with \"format\": \"{RUN_FORMAT}\"")
    if cfg.get("version") != RUN_VERSION:
        raise CheckpointError(
            f"{cfg_path}: run format version {cfg.get('version')!r} is not supported (expected {RUN_VERSION})"
        )
    if not isinstance(cfg.get("model"), dict):
        raise CheckpointError(f"{cfg_path}: the \"model\" entry is missing")
    return cfg


def quant_of(cfg: dict) -> dict | None:
    """A run config's "quant" entry (a quantised run), or None for a float run. Only its
    presence is the run directory's business; `moelab.quant.checkpoint` validates it."""
    return cfg.get(QUANT_KEY)


def model_config_of(cfg: dict, path: str | Path) -> ModelConfig:
    """The `ModelConfig` of a run config `cfg` read from `path` by `read_run_config`
    (fields added since the run was written take their defaults)."""
    try:
        return ModelConfig.from_dict(cfg["model"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{config_path(path)}: the model config is invalid: {e}") from None


def model_config_from_run(path: str | Path) -> ModelConfig:
    return model_config_of(read_run_config(path), path)


def write_run_config(
    run_dir: str | Path,
    model_cfg: ModelConfig,
    train: dict | None = None,
    data: dict | None = None,
    *,
    source: dict | None = None,
    quant: dict | None = None,
    sha256: dict[str, str] | None = None,
) -> Path:
    """Write ``config.json`` (atomically); `source` records where converted weights came
    from, `quant` how the experts are quantised (`moelab.quant.checkpoint`), `sha256` the
    digests of the files already written (``{MODEL_FILE: hex}``, `recorded_sha256`)."""
    body: dict[str, Any] = {
        "format": RUN_FORMAT,
        "version": RUN_VERSION,
        "model": model_cfg.to_dict(),
        "train": train,
        "data": data,
    }
    if source is not None:
        body["source"] = source
    if quant is not None:
        body[QUANT_KEY] = quant
    if sha256 is not None:
        body[SHA256_KEY] = sha256
    path = Path(run_dir) / CONFIG_FILE
    atomic_write_json(path, body)
    return path


def recorded_sha256(run_dir: str | Path, cfg: dict | None = None) -> str | None:
    """The sha256 the run recorded for its ``model.safetensors``, or None (a run written
    before digests were recorded). A trained run's ``trainer_state.json`` comes first: it
    is rewritten with every checkpoint, the config only at the start of a run.

    `cfg` is the run's config as `read_run_config` returned it (read again if None)."""
    state_path = Path(run_dir) / STATE_FILE
    if state_path.is_file():
        try:
            state = json.loads(state_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{state_path} is not valid JSON ({e}); the checkpoint is corrupt") from None
        digest = state.get(SHA256_KEY, {}).get(MODEL_FILE) if isinstance(state, dict) else None
        if isinstance(digest, str):
            return digest
    cfg = read_run_config(run_dir) if cfg is None else cfg
    digest = (cfg.get(SHA256_KEY) or {}).get(MODEL_FILE)
    return digest if isinstance(digest, str) else None


def check_out_dir(out: str | Path, overwrite: bool) -> None:
    """Refuse an `out` that a writer of a whole run folder (`moelab.quant.save_quantized`,
    ``convert --to-moelab``) may not replace: a file, a non-empty folder without
    `overwrite`, or (even with it) a non-empty folder that is not a moelab run."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise CheckpointError(f"{out}: exists and is a file, not a folder; choose a folder for the run")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise CheckpointError(f"{out}: exists and is not empty (pass overwrite=True / --overwrite)")
    if not is_run_dir(out):
        raise CheckpointError(f"{out}: exists and is not a moelab run directory; refusing to replace it "
                              "(even with overwrite)")


def tokenizer_of(run_dir: str | Path) -> Path | None:
    """The run's ``tokenizer.json``, or None when it has none."""
    tok = Path(run_dir) / TOKENIZER_FILE
    return tok if tok.is_file() else None
