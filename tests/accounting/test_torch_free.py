"""Sizing starts instantly: accounting, and `moelab size` on a preset, never import torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import moelab

SRC = str(Path(moelab.__file__).resolve().parents[1])


def _run(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)


def test_import_and_size_a_preset_without_torch():
    out = _run(
        "import sys\n"
        "import moelab.accounting as a\n"
        "assert 'torch' not in sys.modules, 'import moelab.accounting imported torch'\n"
        "for name in ('tiny-moe', 'mixtral-8x7b'):\n"
        "    spec, source, preset = a.resolve(name)\n"
        "    r = a.size_report(spec, source=source, preset=preset)\n"
        "    assert r['total_params'] > 0\n"
        "assert 'torch' not in sys.modules, 'sizing a preset imported torch'\n"
        "print('ok')\n"
    )
    assert out.stdout.strip() == "ok"


def test_cli_size_without_torch(tmp_path):
    out = _run(
        "import sys\n"
        "from moelab.cli.main import main\n"
        "rc = main(['size', 'tiny-moe'])\n"
        "assert rc == 0 and 'torch' not in sys.modules, 'moelab size imported torch'\n"
    )
    assert "tiny-moe" in out.stdout and "total" in out.stdout
