"""Safetensors folders: lazy reading (one file or sharded with an index) and sharded writing.

Reading goes through `safetensors.safe_open`, which memory-maps each file and copies out
only the tensor asked for, so an importer holds at most the model plus one tensor in
flight. Every failure names the file (and the tensor).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from moelab.errors import CheckpointError
from moelab.io import atomic_path, atomic_write_json

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class SafetensorsFolder:
    """The tensors of a model folder, by name, read on demand.

    Use as a context manager (files stay open, i.e. mapped, until exit).
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / INDEX_NAME
        single = self.folder / SINGLE_NAME
        self._where: dict[str, Path] = {}
        self._handles: dict[Path, Any] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index (expected JSON with 'weight_map'): {e}") from e
            for name, file in weight_map.items():
                path = self.folder / file
                if not path.is_file():
                    raise CheckpointError(f"{index}: tensor {name!r} is in shard {file!r}, which is missing from {self.folder}")
                self._where[name] = path
        elif single.is_file():
            for name in self._open(single).keys():
                self._where[name] = single
        else:
            raise CheckpointError(f"{self.folder}: no {SINGLE_NAME} or {INDEX_NAME} found")
        # Open every shard now, so a truncated or corrupt file fails before any work.
        for path in sorted(set(self._where.values())):
            keys = set(self._open(path).keys())
            missing = [n for n, p in self._where.items() if p == path and n not in keys]
            if missing:
                raise CheckpointError(f"{path}: tensor {missing[0]!r} is listed in the index but not in this file")

    def _open(self, path: Path) -> Any:
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{path}: cannot read safetensors file (truncated or corrupt?): {e}") from e
        return self._handles[path]

    def __enter__(self) -> SafetensorsFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self._handles.clear()

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def file_of(self, name: str) -> Path:
        return self._where[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self._where[name]).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        path = self._where[name]
        try:
            return self._open(path).get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{path}: cannot read tensor {name!r}: {e}") from e


def write_sharded(
    tensors: Iterable[tuple[str, torch.Tensor]],
    folder: str | Path,
    *,
    max_shard_size: int,
    metadata: dict[str, str] | None = None,
) -> list[Path]:
    """Write named tensors as ``model.safetensors``, or as shards plus an index when the
    total exceeds `max_shard_size` bytes (greedy, in order; a tensor larger than the
    limit gets a shard of its own). Tensors are consumed lazily: at most one shard is
    held in memory. Each file is written atomically.
    """
    folder = Path(folder)
    metadata = {"format": "pt", **(metadata or {})}
    shards: list[dict[str, torch.Tensor]] = []
    paths: list[Path] = []
    tmp_names: list[Path] = []
    current: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        nonlocal current, size
        if not current:
            return
        tmp = folder / f".shard-{len(tmp_names):05d}.safetensors.tmp"
        with atomic_path(tmp) as p:
            save_file(current, str(p), metadata=metadata)
        tmp_names.append(tmp)
        shards.append({k: torch.empty(0) for k in current})  # names only
        current, size = {}, 0

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_size:
            flush()
        current[name] = t.contiguous()
        size += nbytes
        total += nbytes
    flush()

    n = len(tmp_names)
    if n == 1:
        final = folder / SINGLE_NAME
        tmp_names[0].replace(final)
        return [final]
    weight_map: dict[str, str] = {}
    for i, (tmp, names) in enumerate(zip(tmp_names, shards, strict=True)):
        file = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        tmp.replace(folder / file)
        paths.append(folder / file)
        weight_map.update({k: file for k in names})
    atomic_write_json(folder / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return paths
