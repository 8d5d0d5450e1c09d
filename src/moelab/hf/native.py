"""moelab run directories as seen by interop and generation: a thin layer over `moelab.rundir`.

`save_moelab` writes a run directory (``config.json``, ``model.safetensors``, ``tokenizer.json``
when known) with `moelab.rundir.save_model`; `load_moelab` reads one with
`moelab.rundir.load_model`; `load_any` accepts either a moelab run (float, or quantised:
`moelab.quant.load_quantized`) or a Hugging Face folder.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moelab.errors import CheckpointError, ConfigError
from moelab.model import Transformer
from moelab.rundir import LoadedModel, is_run_dir, load_model, quant_of, read_run_config, save_model

__all__ = ["LoadedModel", "load_any", "load_moelab", "save_moelab"]


def save_moelab(
    model: Transformer, out_dir: str | Path, *, tokenizer_path: Path | None = None, source: dict | None = None
) -> Path:
    """Write `model` as a moelab run directory; returns the folder."""
    return save_model(model, out_dir, tokenizer_path=tokenizer_path, source=source)


def load_moelab(path: str | Path, *, device: str | torch.device = "cpu", verify: bool = True) -> LoadedModel:
    """Load a moelab run dir (or its model.safetensors), in eval mode (sha256-checked
    unless ``verify=False``)."""
    return load_model(path, device=device, verify=verify)


def load_any(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             verify: bool = True) -> LoadedModel:
    """A moelab checkpoint (run dir or model.safetensors) or a Hugging Face model folder.

    A folder whose config.json names the moelab format is a run (and a broken one raises
    the `CheckpointError` of `moelab.rundir.read_run_config`); a run with a "quant" entry
    is loaded by `moelab.quant.load_quantized` (``kind`` "moelab-int8", "moelab-int4",
    "moelab-bf16"); any other folder with a config.json is read as Hugging Face (`dtype`
    applies to those only). A moelab run's weights are checked against their recorded
    sha256 unless ``verify=False``.
    """
    from moelab.hf.loader import load_hf

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or folder")
    if is_run_dir(p):
        if quant_of(read_run_config(p)) is not None:
            from moelab.quant.checkpoint import load_quantized

            return load_quantized(p, device=device, verify=verify)
        return load_moelab(p, device=device, verify=verify)
    if p.is_dir() and (p / "config.json").is_file():
        imp = load_hf(p, dtype=dtype, device=device)
        return LoadedModel(imp.model, imp.config, imp.tokenizer_path, p, kind=imp.family)
    raise ConfigError(
        f"{p}: neither a moelab checkpoint (config.json with format 'moelab-run') nor a Hugging Face folder (config.json + safetensors)"
    )
