"""The serving engine over expert parallelism (2 gloo ranks started by `moelab.dist.launch`):
exactly single-process greedy, a failing step on every rank, heartbeats, shutdown, a
killed follower and a killed rank 0."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

import moelab
from moelab.serve.ep import (
    HEARTBEAT,
    MOVE,
    STEP,
    SWAP,
    StepPlan,
    apply_cache_ops,
    decode_plan,
    encode_plan,
)
from moelab.serve.slots import Segment, SlotKVCache

from . import ep_worker as worker

HERE = Path(__file__).parent
SRC = str(Path(moelab.__file__).resolve().parents[1])


def env() -> dict[str, str]:
    return {"PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "MOELAB_DIST_TIMEOUT": "30"}


@pytest.mark.parametrize("plan", [
    StepPlan(HEARTBEAT),
    StepPlan(STEP, (4, 5, 6, 7), (Segment(0, 3, 1), Segment(1, 0, 3)), (0, 3), ((MOVE, 2, 1, 7, 0), (SWAP, 0, 1, 3, 5))),
    StepPlan(STEP, (9,), (Segment(0, 0, 1),), (0,)),
])
def test_plan_round_trip(plan):
    header, payload = encode_plan(plan)
    assert header.dtype == payload.dtype == torch.long
    assert decode_plan(header, payload) == plan


def test_cache_ops_replay_the_same_moves():
    """A follower's cache after replaying the ops equals rank 0's after doing them."""
    def cache():
        c = SlotKVCache(n_layers=2, slots=3, max_len=5, n_kv_heads=1, head_dim=2)
        g = torch.Generator().manual_seed(0)
        for b in (*c.k, *c.v):
            b.copy_(torch.randn(b.shape, generator=g))
        return c

    a, b = cache(), cache()
    a.move(2, 0, 4)
    a.swap(0, 1, 4, 2)
    apply_cache_ops(b, [(MOVE, 2, 0, 4, 0), (SWAP, 0, 1, 4, 2)])
    assert all(torch.equal(x, y) for x, y in zip((*a.k, *a.v), (*b.k, *b.v), strict=True))
    with pytest.raises(ValueError, match="unknown cache op"):
        apply_cache_ops(b, [(7, 0, 0, 0, 0)])


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from moelab.dist.launch import launch

    out = tmp_path_factory.mktemp("ep-serve")
    launch([str(HERE / "ep_worker.py"), str(out), "serve"], 2, timeout_s=120, env=env())
    return torch.load(out / "serve.rank0.pt"), torch.load(out / "serve.rank1.pt")


def reference(prompt: list[int]) -> list[int]:
    from moelab.infer.generate import generate

    torch.set_num_threads(1)
    return generate(worker.build_model(), [prompt], max_new_tokens=worker.NEW).token_ids[0]


@pytest.mark.slow
def test_engine_over_two_ranks_equals_single_process_greedy(served):
    got, _ = served
    req = got["requests"]
    prompts = {f"p{i}": p for i, p in enumerate(worker.PROMPTS)}
    prompts.update(late=worker.LATE, again=worker.AFTER[0], threaded=worker.AFTER[1])
    for key, prompt in prompts.items():
        assert req[key]["reason"] == "length", (key, req[key])
        assert req[key]["tokens"] == reference(prompt), key


@pytest.mark.slow
def test_a_step_failing_on_every_rank_fails_its_requests_and_the_group_goes_on(served):
    got, follower = served
    req = got["requests"]
    for key in ("poison", "after"):  # the same step
        assert req[key]["reason"] == "error" and "poisoned token" in req[key]["error"], req[key]
    assert follower["failed_steps"] == 1
    # Every step rank 0 completed, the follower completed too (the engine counts completed steps).
    assert follower["steps"] == got["steps"] > 0


@pytest.mark.slow
def test_the_followers_cache_replays_rank_0s_slot_moves(served):
    """Rank 0's tokens do not depend on a follower's cache (each rank's rows are its own
    batch), so the follower's own logits are compared: their argmax at every step is rank
    0's, which needs every slot move and swap replayed before the step."""
    got, follower = served
    assert len(got["argmax"]) == got["steps"]
    assert follower["argmax"] == got["argmax"]
    assert follower["heartbeats"] >= 2  # 1 s idle at a 0.2 s heartbeat, and one after the failed step


@pytest.mark.slow
def test_a_killed_follower_stops_rank_0_with_an_error(tmp_path):
    from moelab.dist.launch import LaunchError, launch

    t0 = time.monotonic()
    with pytest.raises(LaunchError, match=r"rank 1 exited with code -9"):
        launch([str(HERE / "ep_worker.py"), str(tmp_path), "kill"], 2, timeout_s=90, env=env())
    assert time.monotonic() - t0 < 60
    got = torch.load(tmp_path / "kill.rank0.pt")
    assert got["engine_lost"] and "rank lost" in got["engine_lost"], got
    assert got["lost"] == [got["engine_lost"]]
    assert got["seconds"] < 30  # noticed at once, not at the collective timeout
    assert set(got["reasons"].values()) == {"error"}, got


@pytest.mark.slow
def test_a_killed_rank_0_ends_the_follower_with_one_error(tmp_path):
    from moelab.dist.launch import LaunchError, launch

    with pytest.raises(LaunchError, match=r"rank 0 exited with code -9"):
        launch([str(HERE / "ep_worker.py"), str(tmp_path), "kill0"], 2, timeout_s=90, env=env())
    got = torch.load(tmp_path / "kill0.rank1.pt")
    # gloo's words vary with the moment of death ("Connection closed by peer", "Read error ...
    # Connection reset by peer"): one line, ours first.
    assert got["error"].startswith("rank 1: rank 0 is gone (receiving the step plan failed: "), got
    assert "Connection" in got["error"] and "\n" not in got["error"], got
