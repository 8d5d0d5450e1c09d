"""Training runs side by side in worker processes (`moelab.train.workers`): the same runs
as one after the other, a worker's error in one line, and Ctrl-C checkpointing every run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from moelab.errors import ConfigError
from moelab.lab.failures import SCALES, run_experiment
from moelab.rundir.files import STATE_FILE
from moelab.train import read_metrics
from moelab.train.compare import compare
from moelab.train.workers import plan_workers

from .conftest import tiny_dense, tiny_moe, tiny_train
from .test_compare import _jsonl, _write_cfg


def test_plan_workers_splits_the_thread_budget():
    assert plan_workers(3, None, threads=2) == (2, 1)  # one per thread, at most one per run
    assert plan_workers(1, None, threads=4) == (1, 4)
    assert plan_workers(3, 3, threads=2) == (3, 1)  # asked for: at least one thread each
    assert plan_workers(4, 2, threads=8) == (2, 4)
    assert plan_workers(3, 1, threads=2) == (1, 2)  # 1: in this process
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="workers must be a positive integer"):
            plan_workers(2, bad)
    with pytest.raises(ConfigError, match="threads must be a positive integer"):
        plan_workers(2, None, threads=0)


@pytest.mark.slow
def test_compare_in_workers_equals_compare_in_one_process(data, tmp_path):
    """One 1-thread worker per model gives the very curves of the same models trained one
    after the other at 1 thread (conftest), and the same comparison."""
    models = {"moe": ("m", tiny_moe()), "dense": ("d", tiny_dense(64))}
    tc = tiny_train(steps=6, eval_interval=3, checkpoint_interval=3)
    one = compare(models, tc, data, tmp_path / "one", progress=False, tensorboard=False)
    two = compare(models, tc, data, tmp_path / "two", progress=False, tensorboard=False, workers=2, threads=2)
    for role in models:
        assert two.models[role].history == one.models[role].history
        assert two.models[role].val_loss == one.models[role].val_loss
        assert two.models[role].threads == 1
    assert two.moe_steps_to_dense_loss == one.moe_steps_to_dense_loss
    assert (tmp_path / "two" / "m" / "model.safetensors").is_file()


@pytest.mark.slow
def test_a_workers_error_reaches_the_caller_as_it_is(data, tmp_path):
    models = {"moe": ("m", tiny_moe()), "dense": ("d", tiny_dense(64))}
    tc = tiny_train(steps=2, eval_interval=2, checkpoint_interval=2)
    compare(models, tc, data, tmp_path / "c", progress=False, tensorboard=False)
    with pytest.raises(ConfigError, match="--overwrite"):  # the runs exist: the trainer's own error
        compare(models, tc, data, tmp_path / "c", progress=False, tensorboard=False, workers=2, threads=2)


@pytest.mark.slow
def test_lab_runs_in_workers_equal_the_runs_in_one_process(data, tmp_path):
    cfg = SCALES["test"].with_(steps=4)
    only = ("broken-no-aux", "aux-loss")
    one = run_experiment("collapse", data, tmp_path / "one", config=cfg, progress=False, only=only)
    two = run_experiment("collapse", data, tmp_path / "two", config=cfg, progress=False, only=only, workers=2,
                         threads=2)
    assert list(two.runs) == list(one.runs)
    for name, run in one.runs.items():
        assert two.runs[name].val_loss == run.val_loss
        assert two.runs[name].busiest_expert_share == run.busiest_expert_share
        assert run.dropped_at_capacity is not None
        assert two.runs[name].dropped_at_capacity == run.dropped_at_capacity  # measured on the trained model, in the worker
    assert two.verdicts == one.verdicts and two.rules == one.rules


@pytest.mark.slow
def test_ctrl_c_checkpoints_every_run_of_a_parallel_compare(data, tmp_path):
    """Ctrl-C in a terminal (SIGINT to the foreground process group) during `moelab compare
    --workers 2`: exit 130 with the resume hint, both runs checkpointed mid-way, and
    ``--resume`` then gives the uninterrupted comparison's curves."""
    common = ["compare", "--moe", _write_cfg(tmp_path / "m.json", tiny_moe()),
              "--dense", _write_cfg(tmp_path / "d.json", tiny_dense(64)), "--dense-total", "none",
              "--data", _jsonl(data, tmp_path), "--steps", "400", "--batch-size", "4", "--seq-len", "32",
              "--eval-interval", "100", "--eval-batches", "1", "--checkpoint-interval", "1000", "--threads", "2",
              "--workers", "2", "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--no-tensorboard",
              "--device", "cpu", "--precision", "fp32"]
    cmd = [sys.executable, "-m", "moelab.cli.main", *common]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    full = subprocess.run([*cmd, "--out", str(tmp_path / "full")], env=env, capture_output=True, text=True)
    assert full.returncode == 0, full.stderr
    cut = tmp_path / "cut"
    proc = subprocess.Popen([*cmd, "--out", str(cut)], env=env, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)

    def rows(name: str) -> int:
        path = cut / name / "metrics.jsonl"
        return path.read_text().count('"train"') if path.exists() else 0

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and min(rows("m"), rows("d")) < 5:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    for name in ("m", "d"):
        step = json.loads((cut / name / STATE_FILE).read_text())["step"]
        assert 5 <= step < 400, name  # each worker checkpointed its own run mid-way
    done = subprocess.run([*cmd, "--out", str(cut), "--resume"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    strip = ("tokens_per_s", "step_time_s", "load_avg_1m")
    for name in ("m", "d"):
        a = [{k: v for k, v in r.items() if k not in strip} for r in read_metrics(tmp_path / "full" / name)]
        b = [{k: v for k, v in r.items() if k not in strip} for r in read_metrics(cut / name)]
        assert a == b, name

# The workers are spawned processes that import their function by name, and pytest's
# importlib mode keeps test modules off sys.path: the tasks below are the standard
# library's own functions.


@pytest.mark.slow
def test_a_worker_that_dies_is_one_clear_error():
    from moelab.errors import WorkerLostError
    from moelab.train.workers import run_parallel

    with pytest.raises(WorkerLostError, match="a worker process died .* m, d did not all finish.*--resume"):
        run_parallel(os._exit, [(3,), (3,)], workers=2, threads=2, names=["m", "d"])  # as the OOM killer leaves it


@pytest.mark.slow
def test_on_wait_reports_while_runs_are_going():
    from moelab.train.workers import run_parallel

    calls = []
    assert run_parallel(time.sleep, [(1.5,), (0.1,)], workers=2, threads=2, on_wait=lambda: calls.append(1),
                        wait_s=0.2) == [None, None]
    assert len(calls) >= 2  # at least once per 0.2 s wait while the 1.5 s run went on


def test_last_step_reads_the_tail_of_a_run_being_written(tmp_path):
    from moelab.train.metrics import last_step

    assert last_step(tmp_path) is None  # no metrics.jsonl yet
    rows = [json.dumps({"kind": "train", "step": s, "pad": "x" * 3000}) for s in range(1, 41)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(rows) + '\n{"kind": "train", "st')  # a row being written
    assert last_step(tmp_path) == 40
    assert last_step(tmp_path / "metrics.jsonl") == 40
