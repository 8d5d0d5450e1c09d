"""The server under load: a full queue, clients that go away, concurrent requests that must
not see each other, and a drain. Every wait is bounded; every server is shut down."""

from __future__ import annotations

import json
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from moelab.data.tokenizer import end_token_ids
from moelab.infer.generate import generate

from .conftest import LONG_TOKENS, MAX_LEN, MODEL_NAME, make_engine, start_server, wait_until


@pytest.fixture()
def LONG(long_prompt) -> dict:
    return {"model": MODEL_NAME, "prompt": long_prompt, "max_tokens": LONG_TOKENS, "temperature": 0}


def _aborts(run) -> int:
    return run.engine.stats().finished.get("abort", 0)


def _data_lines(response: httpx.Response):
    """The SSE data of `response`. Keep the generator while the response should stay open:
    closing it (e.g. garbage collection of ``next(_data_lines(r))``) closes the connection."""
    for line in response.iter_lines():
        if line.startswith("data: "):
            yield line[len("data: "):]


class Streamer(threading.Thread):
    """Reads one SSE response to its end in the background."""

    def __init__(self, url: str, body: dict):
        super().__init__(daemon=True)
        self.url, self.body, self.chunks, self.status = url, body, [], None

    def run(self):
        with httpx.stream("POST", f"{self.url}/v1/completions", json={**self.body, "stream": True}, timeout=30) as r:
            self.status = r.status_code
            for data in _data_lines(r):
                self.chunks.append(data)

    def finish_reason(self) -> str | None:
        bodies = [json.loads(c) for c in self.chunks if c != "[DONE]"]
        return next((b["choices"][0]["finish_reason"] for b in reversed(bodies) if b.get("choices")), None)


@pytest.mark.slow
def test_full_queue_gives_429_with_retry_after(one_slot, LONG):
    url = one_slot.url
    with httpx.stream("POST", f"{url}/v1/completions", json={**LONG, "stream": True}, timeout=30) as holder:
        lines = _data_lines(holder)
        next(lines)  # the slot is taken
        waiter = Streamer(url, {**LONG, "max_tokens": 2})
        waiter.start()
        wait_until(lambda: one_slot.engine.stats().waiting == 1, what="the second request to queue")
        r = httpx.post(f"{url}/v1/completions", json={**LONG, "max_tokens": 2}, timeout=10)
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["code"] == "queue_full"
        with openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=10) as c:
            with pytest.raises(openai.RateLimitError):
                c.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=2)
    waiter.join(20)
    assert waiter.status == 200 and waiter.chunks[-1] == "[DONE]"


@pytest.mark.slow
def test_disconnect_after_one_chunk_frees_the_slot(one_slot, LONG):
    before = _aborts(one_slot)
    with httpx.stream("POST", f"{one_slot.url}/v1/completions", json={**LONG, "stream": True}, timeout=30) as r:
        lines = _data_lines(r)
        next(lines)
        assert one_slot.engine.stats().running == 1 and _aborts(one_slot) == before
    wait_until(lambda: one_slot.engine.stats().running == 0 and _aborts(one_slot) == before + 1,
               what="the aborted request to leave its slot")


@pytest.mark.slow
def test_disconnect_before_reading_a_chunk_frees_the_slot(one_slot, LONG):
    before = _aborts(one_slot)
    with httpx.stream("POST", f"{one_slot.url}/v1/completions", json={**LONG, "stream": True}, timeout=30) as r:
        assert r.status_code == 200  # headers only: the request is submitted, no chunk read
        wait_until(lambda: one_slot.engine.stats().running == 1, what="the request to take the slot")
    wait_until(lambda: one_slot.engine.stats().running == 0 and _aborts(one_slot) == before + 1,
               what="the aborted request to leave its slot")


@pytest.mark.slow
def test_disconnect_before_any_chunk_frees_the_queue_place_and_the_slot(one_slot, LONG):
    before = _aborts(one_slot)
    url = f"{one_slot.url}/v1/completions"
    with httpx.stream("POST", url, json={**LONG, "stream": True}, timeout=30) as holder:
        lines = _data_lines(holder)
        next(lines)
        with httpx.stream("POST", url, json={**LONG, "stream": True}, timeout=30) as queued:
            assert queued.status_code == 200
            wait_until(lambda: one_slot.engine.stats().waiting == 1, what="the second request to queue")
        # closed without reading a chunk, while still queued
        wait_until(lambda: one_slot.engine.stats().waiting == 0 and _aborts(one_slot) == before + 1,
                   what="the queued request to be aborted")
        assert one_slot.engine.stats().running == 1
    wait_until(lambda: one_slot.engine.stats().running == 0 and _aborts(one_slot) == before + 2,
               what="the running request to be aborted")


@pytest.mark.slow
def test_non_streamed_client_that_leaves_frees_the_slot(one_slot, LONG):
    before = _aborts(one_slot)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{one_slot.url}/v1/completions", json=LONG, timeout=httpx.Timeout(10, read=0.3))
    wait_until(lambda: one_slot.engine.stats().running == 0 and _aborts(one_slot) == before + 1,
               what="the abandoned request to be aborted")


def _complete(url: str, **kw) -> dict:
    r = httpx.post(f"{url}/v1/completions", json={"model": MODEL_NAME, **kw}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.slow
def test_seeded_sampling_is_reproducible_while_others_run(server):
    seeded = dict(prompt="A router picks", max_tokens=20, temperature=1.0, top_p=0.9, seed=1234)
    noise = [dict(prompt=[7] * n, max_tokens=20, temperature=1.0) for n in (3, 9, 15)]
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(_complete, server.url, **seeded)
        others = [pool.submit(_complete, server.url, **kw) for kw in noise]
        a = first.result()
        b = _complete(server.url, **seeded)  # alone this time
        [o.result() for o in others]
    assert a["moelab"]["token_ids"] == b["moelab"]["token_ids"]
    assert a["choices"][0]["text"] == b["choices"][0]["text"]


@pytest.mark.slow
def test_batching_is_invisible(server, model, tokenizer):
    """Six concurrent greedy requests (more than the 4 slots) of different prompt lengths get
    exactly the tokens each gets alone from `generate`."""
    rng = random.Random(0)
    V = tokenizer.get_vocab_size()
    prompts = [[rng.randrange(V) for _ in range(n)] for n in (1, 4, 9, 17, 33, 60)]
    lengths = [12, 7, 20, 3, 15, 10]
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60) as c:
        def ask(i):
            r = c.completions.create(model=MODEL_NAME, prompt=prompts[i], max_tokens=lengths[i], temperature=0)
            return r.model_extra["moelab"]["token_ids"]

        with ThreadPoolExecutor(len(prompts)) as pool:
            served = list(pool.map(ask, range(len(prompts))))
    stop = end_token_ids(tokenizer)
    for p, n, got in zip(prompts, lengths, served, strict=True):
        alone = generate(model, [p], max_new_tokens=n, temperature=0, stop_token_ids=stop).token_ids[0]
        assert got == alone


@pytest.mark.slow
def test_drain_refuses_new_requests_and_ends_long_ones_with_shutdown(slow_model, tokenizer, LONG):
    run = start_server(make_engine(slow_model, tokenizer, max_num_seqs=2, max_len=MAX_LEN), tokenizer,
                       drain_timeout_s=1.0)
    try:
        long_, short = Streamer(run.url, LONG), Streamer(run.url, {**LONG, "max_tokens": 4})
        long_.start()
        short.start()
        wait_until(lambda: len(long_.chunks) >= 1 and run.engine.stats().running >= 1, what="the requests to start")
        run.server.should_exit = True
        wait_until(lambda: httpx.get(f"{run.url}/health", timeout=5).status_code == 503, what="draining")
        r = httpx.post(f"{run.url}/v1/completions", json={**LONG, "max_tokens": 2}, timeout=5)
        assert r.status_code == 503 and r.json()["error"]["code"] == "draining"
        long_.join(20)
        short.join(20)
        assert short.finish_reason() in ("length", "stop")
        assert long_.finish_reason() == "shutdown" and long_.chunks[-1] == "[DONE]"
    finally:
        run.stop()
