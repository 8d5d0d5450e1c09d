"""moelab checkpoints (the run-directory contract) as seen by interop and generation.

`save_moelab` writes a run-dir-like folder: ``config.json`` (format "moelab-run"),
``model.safetensors`` (tied head stored once) and ``tokenizer.json`` when known.
`load_moelab` reads one with `moelab.train.checkpoint.load_model` when the trainer's
loader is installed, else with the minimal loader here (same contract). `load_any`
accepts either a moelab checkpoint or a Hugging Face folder.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from moelab.errors import CheckpointError, ConfigError
from moelab.hf.weights import SafetensorsFolder
from moelab.io import atomic_path, atomic_write_json
from moelab.model import ModelConfig, Transformer

log = logging.getLogger(__name__)

RUN_FORMAT = "moelab-run"


@dataclass
class LoadedModel:
    model: Transformer  # eval mode
    config: ModelConfig
    tokenizer_path: Path | None
    run_dir: Path
    kind: str = "moelab"  # "moelab" or the HF model_type


def moelab_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The state dict with a tied head stored once (safetensors refuses shared storage)."""
    state = dict(model.state_dict())
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def save_moelab(
    model: Transformer, out_dir: str | Path, *, tokenizer_path: Path | None = None, source: dict | None = None
) -> Path:
    """Write `model` as a moelab checkpoint folder; returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "model.safetensors") as tmp:
        save_file({k: v.detach().contiguous() for k, v in moelab_state_dict(model).items()}, str(tmp), metadata={"format": "pt"})
    if tokenizer_path is not None:
        with atomic_path(out / "tokenizer.json") as tmp:
            shutil.copyfile(tokenizer_path, tmp)
    atomic_write_json(
        out / "config.json",
        {"format": RUN_FORMAT, "version": 1, "model": model.cfg.to_dict(), "train": None, "data": None, "source": source},
    )
    return out


def is_moelab_checkpoint(path: Path) -> bool:
    folder = path.parent if path.suffix == ".safetensors" else path
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8")).get("format") == RUN_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def load_moelab(path: str | Path, *, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a moelab run dir (or its model.safetensors), preferring the trainer's loader."""
    try:
        from moelab.train.checkpoint import load_model  # the shared contract, when present
    except ImportError:
        load_model = None
    if load_model is not None:
        loaded = load_model(path, device=device)
        return LoadedModel(loaded.model, loaded.config, loaded.tokenizer_path, Path(loaded.run_dir))
    return _load_moelab_minimal(Path(path), device)


def _load_moelab_minimal(path: Path, device: str | torch.device) -> LoadedModel:
    folder = path.parent if path.suffix == ".safetensors" else path
    cfg_path = folder / "config.json"
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
        cfg = ModelConfig.from_dict(meta["model"])
    except FileNotFoundError as e:
        raise CheckpointError(f"{cfg_path}: missing (expected a moelab run directory)") from e
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{cfg_path}: not a moelab run config ({e})") from e
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    with SafetensorsFolder(folder) as st:
        for key, ref in expected.items():
            if key == "lm_head.weight" and cfg.tie_embeddings:
                continue
            if key not in st:
                raise CheckpointError(f"{folder / 'model.safetensors'}: tensor {key!r} is missing")
            t = st.get(key)
            if tuple(t.shape) != tuple(ref.shape):
                raise CheckpointError(
                    f"{st.file_of(key)}: tensor {key!r} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}"
                )
            state[key] = t
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    tok = folder / "tokenizer.json"
    return LoadedModel(model.to(device).eval(), cfg, tok if tok.is_file() else None, folder)


def load_any(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> LoadedModel:
    """A moelab checkpoint (run dir or model.safetensors) or a Hugging Face model folder."""
    from moelab.hf.loader import load_hf

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or folder")
    if is_moelab_checkpoint(p):
        return load_moelab(p, device=device)
    if p.is_dir() and (p / "config.json").is_file():
        imp = load_hf(p, dtype=dtype, device=device)
        return LoadedModel(imp.model, imp.config, imp.tokenizer_path, p, kind=imp.family)
    raise ConfigError(
        f"{p}: neither a moelab checkpoint (config.json with format 'moelab-run') nor a Hugging Face folder (config.json + safetensors)"
    )
