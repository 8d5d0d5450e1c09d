"""`moelab serve --nproc 2 --ep 2` as users run it: rank 0 answers the official `openai`
client with single-process greedy output, and SIGTERM to the launcher ends every rank."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from .conftest import save_tiny_mixtral
from .test_process import start

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow

PROMPTS = [[5, 6, 7], list(range(20, 37)), [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50], [9]]
NEW = 8


@pytest.fixture(scope="module")
def folder(tokenizer, tmp_path_factory):
    """The tests' tiny Mixtral (4 experts, large weights) with its tokenizer, on disk."""
    out = save_tiny_mixtral(tokenizer, tmp_path_factory.mktemp("served-ep"), max_len=128)
    tokenizer.save(str(out / "tokenizer.json"))
    return out


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def assert_gone(pids: list[int], output: str, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while any(alive(pid) for pid in pids):
        assert time.monotonic() < deadline, f"ranks still running after the launcher exited: {output}"
        time.sleep(0.1)


def test_serve_over_two_ranks_answers_like_one_process_and_sigterm_ends_every_rank(folder):
    from moelab.hf import load_any
    from moelab.infer.generate import generate

    torch.set_num_threads(1)
    model = load_any(folder).model.eval()
    want = [generate(model, [p], max_new_tokens=NEW).token_ids[0] for p in PROMPTS]

    # 8 tokens a step: the 17-token prompt is prefilled over three steps.
    proc, url = start(folder, "--nproc", "2", "--ep", "2", "--max-num-seqs", "4", "--max-batch-tokens", "8")
    try:
        ranks = children(proc.pid)
        assert len(ranks) == 2
        with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60) as client:
            def ask(prompt):
                r = client.completions.create(model=str(folder), prompt=prompt, max_tokens=NEW, temperature=0,
                                              extra_body={"ignore_eos": True})
                return r.model_extra["moelab"]["token_ids"], r.choices[0].finish_reason

            with ThreadPoolExecutor(len(PROMPTS)) as pool:  # concurrent: batched into the same steps
                got = list(pool.map(ask, PROMPTS))
        assert [ids for ids, _ in got] == want
        assert {reason for _, reason in got} == {"length"}

        proc.send_signal(signal.SIGTERM)  # to the launcher: rank 0 drains, then stops the follower
        assert proc.wait(timeout=60) == 0
        output = proc.stdout.read()
        assert "draining" in output
        assert_gone(ranks, output)
    finally:
        if proc.poll() is None:
            for pid in children(proc.pid):
                Path(f"/proc/{pid}").exists() and __import__("os").kill(pid, signal.SIGKILL)
            proc.kill()
            proc.wait()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().split(") ")[1].split()
    return (int(fields[11]) + int(fields[12])) / __import__("os").sysconf("SC_CLK_TCK")  # utime + stime


def test_idle_followers_do_not_spin_and_a_killed_follower_ends_the_job_with_an_error(folder):
    import os

    proc, url = start(folder, "--nproc", "2", "--ep", "2")
    try:
        rank0, rank1 = children(proc.pid)
        before = cpu_seconds(rank1)
        time.sleep(3)  # idle: the follower blocks in the broadcast between heartbeats
        assert cpu_seconds(rank1) - before < 0.5
        os.kill(rank1, signal.SIGKILL)
        assert proc.wait(timeout=30) == 2
        output = proc.stdout.read()
        assert "rank 1 exited with code -9" in output, output
        assert "the engine stopped: expert-parallel rank lost (broadcasting the step plan failed: " in output, output
        assert_gone([rank0], output)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_ctrl_c_to_the_process_group_drains_once_and_ends_every_rank(folder):
    """A terminal's Ctrl-C goes to the whole foreground group: the ranks sit in a group of
    their own, so rank 0 gets one SIGINT (from the launcher) and drains gracefully."""
    import os

    proc, url = start(folder, "--nproc", "2", "--ep", "2", new_session=True)
    try:
        ranks = children(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        output = proc.stdout.read()
        assert "draining" in output and "Traceback" not in output, output
        assert_gone(ranks, output)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
