"""Training at EP=2 (two gloo processes): the one-process loss curve, a consolidated
checkpoint that resumes at EP=1, and a killed rank that ends the job with one error."""

from __future__ import annotations

import json
import time

import pytest

from moelab.dist.launch import LaunchError, launch
from moelab.train import read_metrics, train

from .conftest import HERE, env

STEPS = 20


def _worker():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_worker", HERE / "train_worker.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


w = _worker()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("ep-data")
    w.data(str(path))  # prepared once here; the ranks read the cache
    return path


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir, kind="train")}


@pytest.fixture(scope="module")
def ep2_runs(cache, tmp_path_factory):
    """One launch, two runs: 20 steps, and 2 steps (to be resumed at EP=1)."""
    root = tmp_path_factory.mktemp("ep2")
    full, short = root / "full", root / "short"
    launch([str(HERE / "train_worker.py"), str(cache), f"{full}:{STEPS}", f"{short}:2"], 2, timeout_s=240,
           env=env())
    return full, short


@pytest.fixture(scope="module")
def ep2_run(ep2_runs):
    return ep2_runs[0]


@pytest.fixture(scope="module")
def one_process_run(cache, tmp_path_factory):
    run = tmp_path_factory.mktemp("ep1") / "run"
    train(w.model_cfg(), w.train_cfg(STEPS), w.data(str(cache)), run, progress=False, tensorboard=False)
    return run


def test_ep2_loss_curve_equals_one_process(ep2_run, one_process_run):
    got, want = _losses(ep2_run), _losses(one_process_run)
    assert sorted(got) == list(range(1, STEPS + 1))
    worst = max(abs(got[s] - want[s]) / abs(want[s]) for s in want)
    print(f"{STEPS}-step loss curve, EP=2 vs one process: max relative diff {worst:.3g}")
    assert worst < 1e-5
    assert got[STEPS] < got[1]  # it trains


def test_deterministic_under_a_seed(ep2_runs):
    full, short = (_losses(r) for r in ep2_runs)
    assert [full[1], full[2]] == [short[1], short[2]]  # two EP=2 runs, same seed: bit for bit


def test_metrics_and_checkpoint_written_once_by_rank_0(ep2_run):
    rows = read_metrics(ep2_run, kind="train")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # one row per step, not one per rank
    state = json.loads((ep2_run / "trainer_state.json").read_text())
    assert state["step"] == STEPS and state["saved_at_ep"] == 2


def test_checkpoint_at_ep2_resumes_at_ep1_with_the_uninterrupted_losses(cache, ep2_runs):
    ep2_run, run = ep2_runs
    # Two steps at EP=2 (warmup is 2 steps, so their learning rates do not depend on --steps),
    # then the rest in one process, from the consolidated checkpoint.
    train(w.model_cfg(), w.train_cfg(STEPS), w.data(str(cache)), run, resume=True, progress=False,
          tensorboard=False)
    got, want = _losses(run), _losses(ep2_run)
    worst = max(abs(got[s] - want[s]) / abs(want[s]) for s in range(3, STEPS + 1))
    print(f"resumed at EP=1 after 2 steps at EP=2: next-step loss {got[3]:.6f} vs {want[3]:.6f}; "
          f"max relative diff over steps 3..{STEPS} {worst:.3g}")
    assert abs(got[3] - want[3]) / want[3] < 1e-5
    assert worst < 1e-5


def test_a_killed_rank_ends_every_rank_with_one_error(cache, tmp_path):
    run = tmp_path / "run"
    t0 = time.monotonic()
    with pytest.raises(LaunchError, match="rank 1 exited with code -9") as e:
        # grace_s: rank 0 must end by itself (gloo sees the dead peer), not by the launcher.
        launch([str(HERE / "train_worker.py"), str(cache), f"{run}:{STEPS}", "--kill", "1:2"], 2,
               timeout_s=120, env=env(), grace_s=60)
    assert time.monotonic() - t0 < 60
    assert "every rank has been ended" in str(e.value)
    assert not (run / "trainer_state.json").exists()  # no checkpoint before the end: none half-written


def _dp_launch(cache, root, nproc: int, ep: int):
    full, short = root / "full", root / "short"
    launch([str(HERE / "train_worker.py"), str(cache), f"{full}:{STEPS}", f"{short}:2"], nproc, timeout_s=400,
           env=env(EP=str(ep)))
    return full, short


@pytest.mark.slow
@pytest.mark.parametrize("nproc, ep", [(2, 1), (4, 2)], ids=["dp2xep1", "dp2xep2"])
def test_dp2_loss_curve_checkpoint_and_resume_equal_one_process(cache, one_process_run, tmp_path, nproc, ep):
    """dp=2 (each dp rank half the batch) with every rank all experts (ep=1), or the experts
    over 2 ranks in each dp group (ep=2, 4 processes): 20 steps, and 2 resumed in one process."""
    full, short = _dp_launch(cache, tmp_path, nproc, ep)
    got, want = _losses(full), _losses(one_process_run)
    assert sorted(got) == list(range(1, STEPS + 1))
    worst = max(abs(got[s] - want[s]) / abs(want[s]) for s in want)
    print(f"{STEPS}-step loss curve, dp=2 x ep={ep} vs one process: max relative diff {worst:.3g}")
    assert worst < 1e-5
    state = json.loads((full / "trainer_state.json").read_text())
    assert state["step"] == STEPS and state["saved_at_ep"] == ep and state["saved_world"] == nproc
    # The checkpoint after 2 steps, resumed in one process: the uninterrupted run's losses.
    train(w.model_cfg(), w.train_cfg(STEPS), w.data(str(cache)), short, resume=True, progress=False,
          tensorboard=False)
    resumed = _losses(short)
    worst = max(abs(resumed[s] - got[s]) / abs(got[s]) for s in range(3, STEPS + 1))
    print(f"resumed in one process after 2 steps at dp=2 x ep={ep}: max relative diff over steps 3..{STEPS} "
          f"{worst:.3g}")
    assert worst < 1e-5


@pytest.mark.slow
def test_one_process_checkpoint_resumes_at_dp2_x_ep2(cache, one_process_run, tmp_path):
    """The other way: 2 steps in one process, the rest over a 2 x 2 mesh (4 processes)."""
    run = tmp_path / "run"
    train(w.model_cfg(), w.train_cfg(2), w.data(str(cache)), run, progress=False, tensorboard=False)
    launch([str(HERE / "train_worker.py"), str(cache), f"{run}:{STEPS}"], 4, timeout_s=400, env=env(EP="2"))
    got, want = _losses(run), _losses(one_process_run)
    worst = max(abs(got[s] - want[s]) / abs(want[s]) for s in range(3, STEPS + 1))
    print(f"resumed at dp=2 x ep=2 after 2 steps in one process: max relative diff over steps 3..{STEPS} {worst:.3g}")
    assert sorted(got) == list(range(1, STEPS + 1)) and worst < 1e-5
