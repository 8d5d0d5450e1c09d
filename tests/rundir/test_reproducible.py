"""Saved safetensors files are byte-reproducible: the same tensors and metadata, the same sha256."""

from __future__ import annotations

import torch
from safetensors import safe_open

from moelab import rundir
from moelab.io import sha256_file

from .conftest import random_model, tiny_cfg


def test_same_tensors_and_metadata_give_the_same_bytes(tmp_path):
    tensors = {f"t{i}": torch.full((3,), float(i)) for i in range(8)}
    metadata = {"format": "pt", "moelab_step": "5", "moelab_quant": "int8", "a": "1", "b": "2", "zz": "3"}
    digests = set()
    for i in range(12):  # safetensors alone gave 16 different files in 20 saves of this
        rundir.save_safetensors(tensors, tmp_path / f"{i}.safetensors", metadata=metadata)
        digests.add(sha256_file(tmp_path / f"{i}.safetensors"))
    assert len(digests) == 1
    with safe_open(str(tmp_path / "0.safetensors"), "pt") as f:  # still a valid file, metadata intact
        assert f.metadata() == metadata and torch.equal(f.get_tensor("t3"), tensors["t3"])


def test_save_model_twice_gives_identical_files(tmp_path):
    model = random_model(tiny_cfg())
    a = rundir.save_model(model, tmp_path / "a")
    b = rundir.save_model(model, tmp_path / "b")
    assert sha256_file(a / "model.safetensors") == sha256_file(b / "model.safetensors")
