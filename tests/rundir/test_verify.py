"""Every loader of a moelab run checks model.safetensors against its recorded sha256."""

from __future__ import annotations

import json

import pytest

from moelab import rundir
from moelab.cli.main import main
from moelab.errors import CheckpointError
from moelab.hf import load_any
from moelab.io import sha256_file
from moelab.moe import MoEConfig
from moelab.quant import quantize_model
from moelab.quant.checkpoint import load_quantized, save_quantized

from .conftest import random_model, tiny_cfg


@pytest.fixture
def softmax_run(tmp_path):
    """A run HF can express (softmax routing), so `convert --to-hf` gets as far as the weights."""
    moe = MoEConfig(d_model=32, d_expert=16, num_experts=4, top_k=2)
    return rundir.save_model(random_model(tiny_cfg(moe=moe)), tmp_path / "run")


def flip_one_bit(path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-7] ^= 0x01  # one bit of the last tensor's data (the header is at the start)
    path.write_bytes(bytes(raw))


def test_save_model_records_the_digest(saved):
    _, run = saved
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["sha256"] == {"model.safetensors": sha256_file(run / "model.safetensors")}
    assert rundir.recorded_sha256(run) == cfg["sha256"]["model.safetensors"]


@pytest.mark.parametrize("loader", [rundir.load_model, load_any], ids=["load_model", "load_any"])
def test_one_flipped_bit_is_refused(saved, loader):
    _, run = saved
    flip_one_bit(run / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors does not match the sha256.*--no-verify"):
        loader(run)
    with pytest.raises(CheckpointError, match="sha256"):
        loader(run / "model.safetensors")
    assert loader(run, verify=False).model is not None  # the escape hatch loads it as is


def test_quantised_run_is_verified(tmp_path):
    model = random_model(tiny_cfg())
    quantize_model(model, "bf16")
    run = save_quantized(model, tmp_path / "q", fmt="bf16")
    load_quantized(run)
    flip_one_bit(run / "model.safetensors")
    for loader in (load_quantized, load_any):
        with pytest.raises(CheckpointError, match="sha256"):
            loader(run)


def test_a_run_without_a_digest_still_loads(saved):
    """Runs written before digests were recorded load as before."""
    _, run = saved
    cfg = json.loads((run / "config.json").read_text())
    del cfg["sha256"]
    (run / "config.json").write_text(json.dumps(cfg))
    assert rundir.recorded_sha256(run) is None
    rundir.load_model(run)


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "{run}", "--prompt", "hi"],
        ["analyze", "{run}", "--out", "{tmp}/analysis"],
        ["convert", "{run}", "--to-hf", "{tmp}/hf"],
        ["quantize", "{run}", "{tmp}/q", "--format", "int8"],
    ],
    ids=["generate", "analyze", "convert-to-hf", "quantize"],
)
def test_every_cli_loader_refuses_corrupt_weights(softmax_run, tmp_path, capsys, argv):
    run = softmax_run
    flip_one_bit(run / "model.safetensors")
    argv = [a.format(run=run, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sha256" in err and "--no-verify" in err
    assert not (tmp_path / "hf").exists() and not (tmp_path / "q").exists()


def test_convert_no_verify_exports_anyway(softmax_run, tmp_path):
    run = softmax_run
    flip_one_bit(run / "model.safetensors")
    assert main(["convert", str(run), "--to-hf", str(tmp_path / "hf"), "--no-verify"]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()
