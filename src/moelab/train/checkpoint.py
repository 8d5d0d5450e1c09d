"""Trainer checkpoints: optimizer state, RNG states, sha256-verified saves and exact resume.

The run directory itself (file names, ``config.json``, weights, `load_model`) is
`moelab.rundir`; this module adds what only the trainer writes:

    optimizer.safetensors  optimizer tensors (AdamW moments and step counts) by parameter name
    trainer_state.json     step, optimizer scalars, RNG states, sha256 of the two safetensors files

Atomicity: each file goes through `moelab.io.atomic_path`. A checkpoint is three files, so
all three are first written and fsynced under temporary names and only then renamed, with
`trainer_state.json` last; it records the sha256 of the other two, so a resume that finds
files from different checkpoints (a kill in the rename window) or damaged bytes refuses
with `CheckpointError` instead of silently continuing from a mix.
"""

from __future__ import annotations

import base64
import contextlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from moelab.errors import CheckpointError
from moelab.io import atomic_path, free_space_text, is_disk_full, sha256_file
from moelab.rundir.files import MODEL_FILE, OPTIMIZER_FILE, STATE_FILE
from moelab.rundir.weights import load_weights, read_tensors, save_safetensors, save_weights

# ---------------------------------------------------------------------------- config


def config_differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Human-readable `field: a != b` lines for two nested config dicts."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_differences(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {va!r} != {vb!r}")
    return out


# ---------------------------------------------------------------------------- RNG


def capture_rng_state() -> dict:
    """torch (CPU and CUDA), numpy and python RNG states as JSON-able values."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii"),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode("ascii") for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(
            [torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8) for s in state["cuda"]]
        )


# ---------------------------------------------------------------------------- checkpoints


_sha256 = sha256_file


def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


def _optimizer_payload(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state keyed by parameter *name* (not position), tensors and scalars apart."""
    names = _param_names(model)
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    groups = []
    for group in optimizer.param_groups:
        group_names = [names[id(p)] for p in group["params"]]
        groups.append({"params": group_names, **{k: v for k, v in group.items() if k != "params"}})
        for p, name in zip(group["params"], group_names, strict=True):
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{name}::{key}"] = value.detach().to("cpu").contiguous()
                else:
                    scalars.setdefault(name, {})[key] = value
    return tensors, {"param_groups": groups, "scalars": scalars}


def save_checkpoint(
    run_dir: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    state: dict,
) -> None:
    """Write model, optimizer and trainer state for `step` (see the module docstring)."""
    run_dir = Path(run_dir)
    try:
        _save_checkpoint(run_dir, model=model, optimizer=optimizer, step=step, state=state)
    except Exception as e:
        if not is_disk_full(e):
            raise
        # The atomic writes left no partial file and the previous checkpoint as it was.
        then = ("the previous checkpoint is intact: free some space, then continue with --resume"
                if (run_dir / STATE_FILE).is_file() else
                "no file was half-written: free some space, then start again with --overwrite")
        raise CheckpointError(
            f"cannot write the step-{step} checkpoint in {run_dir}: the disk is full "
            f"({free_space_text(run_dir)}); {then}"
        ) from None


def _save_checkpoint(run_dir: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
                     state: dict) -> None:
    meta = {"moelab_step": str(step)}
    opt_tensors, opt_json = _optimizer_payload(model, optimizer)
    with contextlib.ExitStack() as stack:
        # Entered state-first so it is renamed last (ExitStack unwinds in reverse).
        state_tmp = stack.enter_context(atomic_path(run_dir / STATE_FILE))
        model_tmp = stack.enter_context(atomic_path(run_dir / MODEL_FILE))
        opt_tmp = stack.enter_context(atomic_path(run_dir / OPTIMIZER_FILE))
        save_weights(model, model_tmp, metadata=meta)
        save_safetensors(opt_tensors, opt_tmp, metadata={"format": "pt", **meta})
        full = {
            "step": step,
            "optimizer": opt_json,
            "rng": capture_rng_state(),
            "sha256": {MODEL_FILE: _sha256(model_tmp), OPTIMIZER_FILE: _sha256(opt_tmp)},
            **state,
        }
        state_tmp.write_text(json.dumps(full) + "\n", encoding="utf-8")


def read_trainer_state(run_dir: str | Path) -> dict:
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: there is no checkpoint to resume from in {Path(run_dir)}")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the checkpoint is corrupt") from None
    for key in ("step", "optimizer", "rng", "sha256"):
        if not isinstance(state, dict) or key not in state:
            raise CheckpointError(f"{path}: the field {key!r} is missing; the checkpoint is corrupt")
    return state


def load_checkpoint(run_dir: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore model weights, optimizer state and RNG states; return the trainer state.

    Verifies the sha256 of both safetensors files against `trainer_state.json` first, so a
    damaged file or files from different checkpoints raise `CheckpointError`.
    """
    run_dir = Path(run_dir)
    state = read_trainer_state(run_dir)
    for name, digest in state["sha256"].items():
        path = run_dir / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} does not exist")
        if _sha256(path) != digest:
            raise CheckpointError(
                f"{path} does not match {run_dir / STATE_FILE} (sha256 differs): the file is corrupt "
                "or from another checkpoint; delete the run directory or restore the file"
            )
    load_weights(model, run_dir / MODEL_FILE)
    opt_tensors, _ = read_tensors(run_dir / OPTIMIZER_FILE)
    _load_optimizer(run_dir, model, optimizer, opt_tensors, state["optimizer"])
    restore_rng_state(state["rng"])
    return state


def _load_optimizer(
    run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], saved: dict
) -> None:
    names = _param_names(model)
    current = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    saved_groups = saved["param_groups"]
    if [g["params"] for g in saved_groups] != current:
        raise CheckpointError(
            f"{run_dir / STATE_FILE}: the optimizer's parameter groups do not match this model "
            "(the checkpoint was saved from a different model or optimizer setup)"
        )
    index = {name: i for i, name in enumerate(n for g in current for n in g)}
    by_param: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        name, _, field = key.rpartition("::")
        if name not in index:
            raise CheckpointError(f"{run_dir / OPTIMIZER_FILE}: state for unknown parameter {name!r}")
        by_param.setdefault(index[name], {})[field] = t
    for name, values in saved.get("scalars", {}).items():
        by_param.setdefault(index[name], {}).update(values)
    groups = []
    for g, names_in_group in zip(saved_groups, current, strict=True):
        g = {k: (tuple(v) if k == "betas" else v) for k, v in g.items()}
        g["params"] = [index[n] for n in names_in_group]
        groups.append(g)
    try:
        optimizer.load_state_dict({"state": by_param, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{run_dir / OPTIMIZER_FILE}: optimizer state does not fit: {e}") from None
