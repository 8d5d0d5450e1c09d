"""`load_model`: built on meta, tensors assigned from the file, bit for bit, ties kept."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from moelab import rundir
from moelab.errors import CheckpointError
from moelab.hf import LoadedModel as HFLoadedModel
from moelab.hf import load_any
from moelab.train import LoadedModel as TrainLoadedModel

from .conftest import VOCAB, random_model, tiny_cfg


def test_load_equals_the_saved_model_bit_for_bit(saved):
    model, run = saved
    loaded = rundir.load_model(run)
    assert isinstance(loaded, rundir.LoadedModel) and loaded.kind == "moelab"
    assert loaded.config == model.cfg and loaded.run_dir == run and not loaded.model.training
    want, got = model.state_dict(), loaded.model.state_dict()
    assert want.keys() == got.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name
    ids = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, model(ids).logits)


def test_one_loaded_model_class():
    assert HFLoadedModel is rundir.LoadedModel and TrainLoadedModel is rundir.LoadedModel


def test_built_on_meta_then_assigned(saved, monkeypatch):
    """No randomly initialised model is materialised: the Transformer is built on meta."""
    from moelab.rundir import weights

    devices = []
    real = weights.Transformer

    def spy(cfg):
        devices.append(torch.empty(0).device.type)
        return real(cfg)

    monkeypatch.setattr(weights, "Transformer", spy)
    loaded = weights.load_model(saved[1])
    assert devices == ["meta"]
    assert not any(t.is_meta for t in loaded.model.state_dict().values())


def test_tied_head_is_saved_once_and_stays_tied(tmp_path):
    model = random_model(tiny_cfg(tie_embeddings=True))
    run = rundir.save_model(model, tmp_path / "run")
    assert "lm_head.weight" not in load_file(run / rundir.MODEL_FILE)
    assert rundir.tied_names(model) == {"lm_head.weight": "embed_tokens.weight"}
    for loaded in (rundir.load_model(run).model, load_any(run).model):
        assert loaded.lm_head.weight is loaded.embed_tokens.weight
        assert loaded.num_params() == model.num_params()
        assert len(list(loaded.parameters())) == len(list(model.parameters()))
        assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    # In-place loading (the trainer's resume) keeps the tie too.
    fresh = random_model(tiny_cfg(tie_embeddings=True), seed=1)
    rundir.load_weights(fresh, run / rundir.MODEL_FILE)
    assert fresh.lm_head.weight is fresh.embed_tokens.weight
    assert torch.equal(fresh.embed_tokens.weight, model.embed_tokens.weight)


def test_weights_path_and_tokenizer(saved, tmp_path):
    model, run = saved
    loaded = rundir.load_model(run / rundir.MODEL_FILE)
    assert loaded.run_dir == run and loaded.tokenizer_path is None
    tok = tmp_path / "tokenizer.json"
    tok.write_text("{}")
    run2 = rundir.save_model(model, tmp_path / "run2", tokenizer_path=tok)
    assert rundir.load_model(run2).tokenizer_path == run2 / rundir.TOKENIZER_FILE


@pytest.mark.parametrize("damage,match", [
    ("truncate", r"model\.safetensors"),
    ("remove", r"model\.safetensors does not exist"),
    ("other-config", r"gate_up_proj.*shape"),
    ("extra-tensor", r"unexpected tensor"),
])
def test_damaged_weights_name_the_file_and_tensor(saved, damage, match):
    model, run = saved
    path = run / rundir.MODEL_FILE
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "remove":
        path.unlink()
    elif damage == "other-config":
        cfg = json.loads((run / "config.json").read_text())
        cfg["model"]["moe"]["d_expert"] = 8
        (run / "config.json").write_text(json.dumps(cfg))
    else:
        from safetensors.torch import save_file

        save_file({**rundir.model_state(model), "extra": torch.zeros(1)}, str(path))
    if damage in ("truncate", "extra-tensor"):  # the bytes changed: the recorded sha256 catches it first
        with pytest.raises(CheckpointError, match=r"model\.safetensors does not match the sha256"):
            rundir.load_model(run)
    with pytest.raises(CheckpointError, match=match):
        rundir.load_model(run, verify=False)
    with pytest.raises(CheckpointError, match=match):
        rundir.load_weights(random_model(tiny_cfg()), path) if damage != "other-config" else rundir.load_model(run)


@pytest.mark.slow
def test_a_loaded_model_holds_one_copy_and_does_not_pin_the_file(tmp_path):
    """After loading, the process holds the weights once (its own memory, ~1x their bytes)
    and no mapping of model.safetensors is left."""
    code = textwrap.dedent(f"""
        import gc, sys, torch
        from moelab.model import ModelConfig, Transformer
        from moelab import rundir
        cfg = ModelConfig(vocab_size=32768, d_model=256, n_layers=1, n_heads=4, n_kv_heads=4, d_ff=256)
        run = {str(tmp_path / "big")!r}
        rundir.save_model(Transformer(cfg), run)
        # Warm up: the first meta-device op loads ~60 MB of torch's meta kernels, once.
        small = cfg.with_(vocab_size=64, d_model=32, n_heads=2, n_kv_heads=2, d_ff=32)
        rundir.load_model(rundir.save_model(Transformer(small), run + "-small"))
        gc.collect()

        def anon():
            for line in open("/proc/self/status"):
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024

        before = anon()
        loaded = rundir.load_model(run)
        gc.collect()
        nbytes = sum(t.numel() * t.element_size() for t in loaded.model.state_dict().values())
        mapped = "model.safetensors" in open("/proc/self/maps").read()
        print((anon() - before) / nbytes, mapped)
    """)
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self/status")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    ratio, mapped = out.stdout.split()
    assert 0.7 < float(ratio) < 1.3 and mapped == "False", out.stdout
