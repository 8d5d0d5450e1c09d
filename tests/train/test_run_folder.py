"""The run folder is never silently mixed, rewritten or left half-written: --overwrite starts
from an empty folder, a finished run resumed is a no-op, a full disk is one clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moelab.cli.main import main
from moelab.errors import CheckpointError, ConfigError
from moelab.rundir import save_model
from moelab.train import checkpoint as ckpt
from moelab.train import train
from moelab.train import trainer as trainer_mod

from .conftest import tiny_moe, tiny_train


def _train(data, run_dir, **kw):
    steps = kw.pop("steps", 6)
    return train(tiny_moe(), tiny_train(steps=steps, eval_interval=3, checkpoint_interval=3), data, run_dir,
                 progress=False, tensorboard=False, **kw)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_starts_from_an_empty_folder(data, run_dir):
    _train(data, run_dir)
    (run_dir / "analysis.json").write_text("{}")  # what `moelab analyze` leaves in a run
    (run_dir / "plots").mkdir()
    (run_dir / "plots" / "specialization_heatmap.png").write_bytes(b"old model's heatmap")
    _train(data, run_dir, steps=3, overwrite=True)
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "config.json", "metrics.jsonl", "model.safetensors", "optimizer.safetensors", "tokenizer.json",
        "trainer_state.json"]
    assert [p.name for p in run_dir.parent.iterdir()] == [run_dir.name]  # the old run is gone, not hidden beside it


def test_overwrite_keeps_the_old_run_if_the_new_one_fails_to_start(data, run_dir, monkeypatch):
    _train(data, run_dir)
    (run_dir / "analysis.json").write_text("{}")
    before = _snapshot(run_dir)

    def no_device(name):
        raise ConfigError("TrainConfig.device='cuda' but no CUDA device is available")

    monkeypatch.setattr(trainer_mod, "resolve_device", no_device)
    with pytest.raises(ConfigError, match="no CUDA"):
        _train(data, run_dir, overwrite=True)
    assert _snapshot(run_dir) == before
    assert [p.name for p in run_dir.parent.iterdir()] == [run_dir.name]


def test_overwrite_never_removes_a_users_files(data, run_dir):
    _train(data, run_dir, steps=3)
    (run_dir / "my_notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"not a run's \(my_notes\.txt\).*even with --overwrite"):
        _train(data, run_dir, overwrite=True)
    assert (run_dir / "my_notes.txt").read_text() == "mine" and (run_dir / "model.safetensors").is_file()


def test_resume_of_a_finished_run_is_a_no_op(data, run_dir, capsys):
    _train(data, run_dir)
    before = _snapshot(run_dir)
    r = _train(data, run_dir, resume=True)
    assert r.already_done and r.steps_done == 6 and r.val_loss is not None and r.step_time_s > 0
    with pytest.raises(ConfigError, match=r"steps=3 \(--steps\): its checkpoint is already at step 6; nothing to do"):
        _train(data, run_dir, steps=3, resume=True)
    assert _snapshot(run_dir) == before  # history (config.json's steps, metrics) is not rewritten


def test_cli_resume_of_a_finished_run_says_nothing_to_do(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["train", "--model", "tiny-dense", "--out", str(out), "--steps", "2", "--batch-size", "2",
              "--seq-len", "16", "--eval-batches", "1", "--no-progress", "--no-tensorboard", "--device", "cpu"]
    assert main(common) == 0
    config = (out / "config.json").read_bytes()
    capsys.readouterr()
    assert main([*common, "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "nothing to do" in printed and "nan" not in printed
    assert main([*common[:-2], "--steps", "1", "--resume"]) == 2
    assert "nothing to do" in capsys.readouterr().err
    assert (out / "config.json").read_bytes() == config


def test_a_run_killed_before_its_first_checkpoint_names_overwrite(data, run_dir):
    class Killed(Exception):
        pass

    def die(step, row):
        raise Killed

    with pytest.raises(Killed):
        _train(data, run_dir, on_step=die)
    assert (run_dir / "config.json").is_file() and not (run_dir / "trainer_state.json").exists()
    with pytest.raises(ConfigError, match=r"stopped before its first checkpoint.*--overwrite"):
        _train(data, run_dir)
    with pytest.raises(CheckpointError, match=r"stopped before its first checkpoint.*nothing to resume.*--overwrite"):
        _train(data, run_dir, resume=True)
    assert _train(data, run_dir, overwrite=True).steps_done == 6


def test_resume_of_a_converted_checkpoint_is_one_line(tmp_path, capsys):
    from moelab.model import Transformer

    run = save_model(Transformer(tiny_moe()), tmp_path / "converted")
    assert json.loads((run / "config.json").read_text())["train"] is None
    assert main(["train", "--resume", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--init-from" in err and "Traceback" not in err


def test_disk_full_during_a_checkpoint_names_the_folder_and_free_space(data, run_dir, monkeypatch):
    real = ckpt.save_weights
    calls = []

    def full_disk(model, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:  # the second checkpoint: the first one is on disk
            raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(model, path, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_weights", full_disk)
    with pytest.raises(CheckpointError) as e:
        _train(data, run_dir)
    msg = str(e.value)
    assert f"step-6 checkpoint in {run_dir}" in msg and "disk is full" in msg and " free of " in msg
    assert "previous checkpoint is intact" in msg and "--resume" in msg
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]  # no half-written temporary
    assert ckpt.read_trainer_state(run_dir)["step"] == 3
    monkeypatch.setattr(ckpt, "save_weights", real)
    assert _train(data, run_dir, resume=True).steps_done == 6
