"""Checkpoints: exact resume, load_model, and clear errors for damaged or mismatched files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moelab.errors import CheckpointError
from moelab.model import Transformer
from moelab.train import load_model, read_metrics, train
from moelab.train.checkpoint import MODEL_FILE, OPTIMIZER_FILE, STATE_FILE

from .conftest import tiny_dense, tiny_moe, tiny_train


class Killed(Exception):
    """Stands in for SIGKILL inside the process: training stops between two steps."""


def _kill_at(step_to_die: int):
    def on_step(step: int, row: dict) -> None:
        if step == step_to_die:
            raise Killed

    return on_step


@pytest.mark.parametrize(
    "cfg",
    [
        # Jitter draws from the torch RNG every step: resume must restore it exactly.
        tiny_moe(jitter_eps=0.1),
        # The aux-loss-free bias is a buffer updated outside the optimizer.
        tiny_moe(router="sigmoid", bias_update_rate=0.01, aux_loss_coef=0.0),
    ],
    ids=["softmax-jitter", "sigmoid-bias"],
)
def test_resume_after_interrupt_is_bit_exact(data, tmp_path, cfg):
    tc = tiny_train(steps=12, checkpoint_interval=6, eval_interval=4)
    full = train(cfg, tc, data, tmp_path / "full", progress=False, tensorboard=False)

    with pytest.raises(Killed):
        train(cfg, tc, data, tmp_path / "cut", progress=False, tensorboard=False, on_step=_kill_at(9))
    assert max(r["step"] for r in read_metrics(tmp_path / "cut")) == 9  # rows past the checkpoint exist
    resumed = train(cfg, tc, data, tmp_path / "cut", resume=True, progress=False, tensorboard=False)

    a = load_file(tmp_path / "full" / MODEL_FILE)
    b = load_file(tmp_path / "cut" / MODEL_FILE)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    oa, ob = load_file(tmp_path / "full" / OPTIMIZER_FILE), load_file(tmp_path / "cut" / OPTIMIZER_FILE)
    assert all(torch.equal(oa[k], ob[k]) for k in oa)
    # The metrics log reads as one run: the rows after the checkpoint were replaced.
    strip = ("tokens_per_s", "step_time_s", "load_avg_1m")
    rows_a = [{k: v for k, v in r.items() if k not in strip} for r in read_metrics(tmp_path / "full")]
    rows_b = [{k: v for k, v in r.items() if k not in strip} for r in read_metrics(tmp_path / "cut")]
    assert rows_a == rows_b
    assert resumed.history == full.history and resumed.val_loss == full.val_loss


def test_resume_can_extend_the_run(data, run_dir):
    train(tiny_moe(), tiny_train(steps=6), data, run_dir, progress=False, tensorboard=False)
    result = train(tiny_moe(), tiny_train(steps=8), data, run_dir, resume=True, progress=False, tensorboard=False)
    assert result.steps_done == 8
    assert [r["step"] for r in read_metrics(run_dir, kind="train")] == list(range(1, 9))


def test_resume_refuses_changed_model_or_settings(data, run_dir):
    train(tiny_moe(), tiny_train(steps=6), data, run_dir, progress=False, tensorboard=False)
    with pytest.raises(CheckpointError, match="d_expert"):
        train(tiny_moe(d_expert=16), tiny_train(steps=6), data, run_dir, resume=True, progress=False)
    with pytest.raises(CheckpointError, match="lr"):
        train(tiny_moe(), tiny_train(steps=6, lr=0.5), data, run_dir, resume=True, progress=False)


def test_resume_of_a_run_saved_before_a_config_field_existed(data, run_dir):
    """A config.json without a field added later (here TrainConfig.precision and
    MoEConfig.router_dtype) means that field's default: the run resumes."""
    import json

    train(tiny_moe(), tiny_train(steps=6), data, run_dir, progress=False, tensorboard=False)
    path = run_dir / "config.json"
    saved = json.loads(path.read_text())
    del saved["train"]["precision"]
    del saved["model"]["moe"]["router_dtype"]
    path.write_text(json.dumps(saved))
    result = train(tiny_moe(), tiny_train(steps=8), data, run_dir, resume=True, progress=False, tensorboard=False)
    assert result.steps_done == 8
    # ...but a non-default value of such a field is still a difference.
    with pytest.raises(CheckpointError, match="precision"):
        train(tiny_moe(), tiny_train(steps=9, precision="bf16"), data, run_dir, resume=True, progress=False)
    saved = json.loads(path.read_text())
    saved["train"]["no_such_field"] = 1
    path.write_text(json.dumps(saved))
    with pytest.raises(CheckpointError, match="does not describe a valid run"):
        train(tiny_moe(), tiny_train(steps=9), data, run_dir, resume=True, progress=False)


def test_resume_without_checkpoint_is_clear(data, tmp_path):
    with pytest.raises(CheckpointError, match="config.json does not exist"):
        train(tiny_moe(), tiny_train(), data, tmp_path / "nothing", resume=True, progress=False)


@pytest.fixture
def finished(data, run_dir) -> Path:
    train(tiny_moe(), tiny_train(steps=6), data, run_dir, progress=False, tensorboard=False)
    return run_dir


def _resume(data, run_dir):
    return train(tiny_moe(), tiny_train(steps=8), data, run_dir, resume=True, progress=False, tensorboard=False)


def test_corrupt_model_file(data, finished):
    path = finished / MODEL_FILE
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte inside the tensor data
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*sha256"):
        _resume(data, finished)


def test_truncated_model_file(data, finished):
    path = finished / MODEL_FILE
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_model(finished)
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        _resume(data, finished)


def test_garbage_trainer_state(data, finished):
    (finished / STATE_FILE).write_text("{not json", encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"trainer_state\.json.*not valid JSON"):
        _resume(data, finished)


def test_missing_optimizer_file(data, finished):
    (finished / OPTIMIZER_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"optimizer\.safetensors does not exist"):
        _resume(data, finished)


def test_load_model_round_trip_and_mismatch(data, finished):
    loaded = load_model(finished / MODEL_FILE)
    assert not loaded.model.training and loaded.config == tiny_moe()
    assert loaded.tokenizer_path == finished / "tokenizer.json" and loaded.run_dir == finished
    weights = load_file(finished / MODEL_FILE)
    assert torch.equal(loaded.model.embed_tokens.weight, weights["embed_tokens.weight"])
    # A config.json that no longer matches the weights: the error names the tensor.
    cfg = json.loads((finished / "config.json").read_text())
    cfg["model"]["moe"]["d_expert"] = 16
    (finished / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"gate_up_proj.*shape"):
        load_model(finished)


def test_tied_embeddings_saved_once(data, run_dir):
    cfg = tiny_dense().with_(tie_embeddings=True)
    train(cfg, tiny_train(steps=2), data, run_dir, progress=False, tensorboard=False)
    assert "lm_head.weight" not in load_file(run_dir / MODEL_FILE)
    model = load_model(run_dir).model
    assert model.lm_head.weight is model.embed_tokens.weight
    assert model.num_params() == Transformer(cfg).num_params()


def _small_jsonl(data, tmp_path):
    """A small two-domain JSONL from the fixture's validation text: quick data preparation
    for the tests that run a real `moelab train`."""
    tok = data.tokenizer
    docs = [{"text": tok.decode(data.val[d][i : i + 400].tolist()), "domain": d}
            for d in ("code", "prose") for i in range(0, 8000, 400)]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in docs))
    return jsonl


@pytest.mark.slow
def test_subprocess_sigkill_then_resume(data, tmp_path):
    """A real `moelab train` killed with SIGKILL after its first checkpoint resumes to the
    same weights as an uninterrupted run."""
    cfg_path = tmp_path / "model.json"
    cfg_path.write_text(json.dumps(tiny_moe().to_dict()))
    jsonl = _small_jsonl(data, tmp_path)
    common = ["--model", str(cfg_path), "--data", str(jsonl), "--steps", "200", "--batch-size", "4",
              "--seq-len", "32", "--checkpoint-interval", "20", "--eval-interval", "100", "--eval-batches", "1",
              "--threads", "1", "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--no-tensorboard",
              "--device", "cpu"]
    cmd = [sys.executable, "-m", "moelab.cli.main", "train", *common]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    full = subprocess.run([*cmd, "--out", str(tmp_path / "full")], env=env, capture_output=True, text=True)
    assert full.returncode == 0, full.stderr
    proc = subprocess.Popen([*cmd, "--out", str(tmp_path / "cut")], env=env, stderr=subprocess.PIPE, text=True)
    state = tmp_path / "cut" / STATE_FILE
    deadline = time.monotonic() + 120
    while not state.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads(state.read_text())["step"] < 200
    resumed = subprocess.run([sys.executable, "-m", "moelab.cli.main", "train", "--resume", "--out",
                              str(tmp_path / "cut"), "--cache-dir", str(tmp_path / "cache"), "--no-progress",
                              "--no-tensorboard", "--threads", "1"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    a, b = load_file(tmp_path / "full" / MODEL_FILE), load_file(tmp_path / "cut" / MODEL_FILE)
    assert all(torch.equal(a[k], b[k]) for k in a)
    shutil.rmtree(tmp_path / "cut")


def test_trained_run_is_verified_by_load_model(data, finished):
    """The digest in trainer_state.json covers the loaders of a trained run, not only --resume."""
    load_model(finished)
    path = finished / MODEL_FILE
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"sha256 recorded in .*trainer_state\.json"):
        load_model(finished)


def test_identical_runs_write_identical_safetensors(data, tmp_path):
    """Byte-reproducible checkpoints: the same run twice gives the same sha256 for both files."""
    from moelab.io import sha256_file

    digests = []
    for name in ("a", "b"):
        train(tiny_moe(), tiny_train(steps=4, checkpoint_interval=2), data, tmp_path / name, progress=False,
              tensorboard=False)
        digests.append({f: sha256_file(tmp_path / name / f) for f in (MODEL_FILE, OPTIMIZER_FILE)})
    assert digests[0] == digests[1]


def test_ctrl_c_writes_a_checkpoint_and_resume_equals_uninterrupted(data, tmp_path):
    """SIGINT to a real `moelab train`: it finishes the step in flight, checkpoints it, prints
    the exact resume command; running that command gives the uninterrupted run's metrics."""
    cfg_path = tmp_path / "model.json"
    cfg_path.write_text(json.dumps(tiny_moe().to_dict()))
    jsonl = _small_jsonl(data, tmp_path)
    common = ["--model", str(cfg_path), "--data", str(jsonl), "--steps", "300", "--batch-size", "4",
              "--seq-len", "32", "--checkpoint-interval", "1000", "--eval-interval", "50", "--eval-batches", "1",
              "--threads", "1", "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--no-tensorboard",
              "--device", "cpu", "--precision", "fp32"]
    cmd = [sys.executable, "-m", "moelab.cli.main", "train", *common]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    full = subprocess.run([*cmd, "--out", str(tmp_path / "full")], env=env, capture_output=True, text=True)
    assert full.returncode == 0, full.stderr
    cut = tmp_path / "cut"
    proc = subprocess.Popen([*cmd, "--out", str(cut)], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    # No checkpoint is due before step 300: wait for a few training rows, then Ctrl-C.
    while time.monotonic() < deadline and proc.poll() is None:
        rows = (cut / "metrics.jsonl").read_text().count('"train"') if (cut / "metrics.jsonl").exists() else 0
        if rows >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    step = json.loads((cut / STATE_FILE).read_text())["step"]
    assert 5 <= step < 300
    assert max(r["step"] for r in read_metrics(cut, kind="train")) == step  # the checkpoint is the last step done
    line = next(x for x in err.splitlines() if x.startswith("resume with: "))
    resume = line.removeprefix("resume with: ").split()
    assert resume[:6] == ["moelab", "train", "--resume", "--out", str(cut), "--cache-dir"]
    done = subprocess.run([sys.executable, "-m", "moelab.cli.main", *resume[1:], "--no-progress"], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    strip = ("tokens_per_s", "step_time_s", "load_avg_1m")
    rows_a = [{k: v for k, v in r.items() if k not in strip} for r in read_metrics(tmp_path / "full")]
    rows_b = [{k: v for k, v in r.items() if k not in strip} for r in read_metrics(cut)]
    assert rows_a == rows_b
    a, b = load_file(tmp_path / "full" / MODEL_FILE), load_file(cut / MODEL_FILE)
    assert all(torch.equal(a[k], b[k]) for k in a)
