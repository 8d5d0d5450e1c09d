"""Helpers for the multi-process tests: the worker script and a launch with hard timeouts."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import moelab

HERE = Path(__file__).parent
SRC = str(Path(moelab.__file__).resolve().parents[1])


def load_worker():
    spec = importlib.util.spec_from_file_location("ep_worker", HERE / "ep_worker.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def env(**extra: str) -> dict[str, str]:
    return {"PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "MOELAB_DIST_TIMEOUT": "30", **extra}


@pytest.fixture(scope="session")
def ranks(tmp_path_factory):
    """One EP=2 launch of `ep_worker.py` for every parity case and the generation check
    (process start-up dominates on 2 cores); the files each rank wrote."""
    from moelab.dist.launch import launch

    worker = load_worker()
    out = tmp_path_factory.mktemp("ep")
    launch([str(HERE / "ep_worker.py"), str(out), *sorted(worker.CASES), "generate"], 2, timeout_s=120, env=env())
    return out


@pytest.fixture(autouse=True)
def _one_thread():
    # The one-process side of each comparison: one thread, like each rank (and a 2-thread
    # process on a loaded 2-core box can run 10x slower, measured in benchmarks/).
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
