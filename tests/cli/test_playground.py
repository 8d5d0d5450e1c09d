"""`moelab playground`: flag errors are one line; a real server process serves the API and,
on Ctrl-C, stops its training run with a checkpoint (resumable) before it exits."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from moelab.cli.main import main
from moelab.rundir.files import STATE_FILE

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.mark.parametrize("argv, flag", [
    (["--port", "0"], "--port"),
    (["--models", "/no/such/folder"], "--models"),
    (["--max-queue", "-1"], "--max-queue"),
])
def test_bad_flags_are_one_line(argv, flag, capsys):
    assert main(["playground", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"moelab playground: error: {flag}"), err


def test_runs_that_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["playground", "--runs", str(tmp_path / "f")]) == 2
    assert "--runs" in capsys.readouterr().err


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


@pytest.mark.slow
def test_ctrl_c_checkpoints_the_running_training(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runs = tmp_path / "runs"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
               OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.Popen([sys.executable, "-m", "moelab.cli.main", "playground", "--port", str(port),
                             "--runs", str(runs)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                assert _get(url + "/api/presets")["presets"]
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
        run = _post(url + "/api/runs", {"experiment": "collapse", "knobs": {"steps": 400}})
        metrics = runs / run["id"] / "broken-no-aux" / "metrics.jsonl"
        deadline = time.monotonic() + 90
        while not (metrics.is_file() and metrics.read_text().count('"train"') >= 2):
            assert time.monotonic() < deadline, "no training rows"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal sends the server
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # uvicorn re-raises the SIGINT once it has shut down: the CLI's usual "interrupted", 130.
    assert proc.returncode == 130, out.decode(errors="replace")
    assert "collapse-001 stopped" in out.decode()
    state = json.loads((runs / run["id"] / "playground.json").read_text())
    assert state["state"] == "stopped" and state["exit_code"] == 130
    assert (runs / run["id"] / "broken-no-aux" / STATE_FILE).is_file()  # the checkpoint --resume reads
    assert "stopped at step" in (runs / run["id"] / "worker.log").read_text()
