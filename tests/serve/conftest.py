"""A tiny model and tokenizer, and real uvicorn servers in background threads.

The model is a random transformers Mixtral (imported with `moelab.hf.from_pretrained`)
whose vocab is that of a byte-level BPE trained on a few sentences. Servers run
`moelab.serve.server.Server` on 127.0.0.1 at a free port in a thread; every fixture shuts
its server down (which drains the engine) and joins the thread.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("fastapi")
pytest.importorskip("openai")

MAX_LEN = 256
MODEL_NAME = "tiny-moe"
KEY = "sk-test-key"

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Mixture of experts models route each token to a few experts.",
    "A router picks the top k experts for every token in the batch.",
    "Continuous batching keeps every slot of the engine busy.",
    "user: hello there\nassistant: hello, how can I help you today?",
] * 4


@pytest.fixture(scope="session")
def tokenizer():
    from moelab.data.tokenizer import train_tokenizer

    return train_tokenizer(SENTENCES, vocab_size=320)


@pytest.fixture(scope="session")
def model(tokenizer, tmp_path_factory):
    from moelab.hf import from_pretrained

    cfg = transformers.MixtralConfig(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_LEN, bos_token_id=None,
        eos_token_id=None, pad_token_id=None, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.normal_(1, 0.2)
    folder = tmp_path_factory.mktemp("tiny-mixtral")
    hf.save_pretrained(folder)
    return from_pretrained(folder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Running:
    url: str  # http://127.0.0.1:PORT
    engine: object
    app: object
    server: object
    thread: threading.Thread

    def stop(self, timeout: float = 20.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the server did not stop"


def make_engine(model, tokenizer, **config):
    try:
        from moelab.serve.engine import Engine, EngineConfig
    except ImportError:  # TODO(serve): remove once the engine lands on main
        return SequentialEngine(model, tokenizer=tokenizer, **config)
    return Engine(model, EngineConfig(**config), tokenizer=tokenizer)


class _Abort(Exception):
    pass


class SequentialEngine:
    """TEST-ONLY stand-in for `moelab.serve.engine.Engine` until it lands: same methods,
    runs requests one at a time through `moelab.infer.generate.generate`."""

    def __init__(self, model, *, tokenizer, max_num_seqs=8, max_batch_tokens=512, max_queue=64, max_len=None):
        import collections

        from moelab.serve.types import StreamEvent  # noqa: F401

        self.model, self.tokenizer, self.max_queue = model, tokenizer, max_queue
        self.max_len = max_len or model.cfg.max_seq_len
        self.queue = collections.deque()
        self.cv = threading.Condition()
        self.closed = False
        self.aborted: dict[str, str] = {}
        self.running = 0
        self.counts = dict(steps=0, prompt=0, gen=0)
        self.finished: dict[str, int] = {}
        self.expert: dict[int, list[int]] = {}
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def start(self):
        self.thread.start()

    def submit(self, request, on_event):
        from moelab.errors import ConfigError
        from moelab.serve.types import EngineClosedError, QueueFullError

        if len(request.prompt_ids) + request.max_tokens > self.max_len:
            raise ConfigError(f"max_tokens: prompt + max_tokens exceeds max_len={self.max_len}")
        with self.cv:
            if self.closed:
                raise EngineClosedError("closed")
            if len(self.queue) >= self.max_queue:
                raise QueueFullError("queue full", retry_after_s=1.0)
            self.queue.append((request, on_event))
            self.cv.notify_all()

    def abort(self, request_id):
        with self.cv:
            self.aborted.setdefault(request_id, "abort")

    def shutdown(self, drain_timeout_s=30.0):
        with self.cv:
            self.closed = True
            self.cv.notify_all()
        self.thread.join(drain_timeout_s)
        with self.cv:
            for r, _ in list(self.queue):
                self.aborted.setdefault(r.request_id, "shutdown")
            if self.running_id:
                self.aborted.setdefault(self.running_id, "shutdown")
            self.cv.notify_all()
        self.thread.join()

    running_id = None

    def stats(self):
        from types import SimpleNamespace

        with self.cv:
            return SimpleNamespace(running=self.running, waiting=len(self.queue), slots=1, steps=self.counts["steps"],
                                   prompt_tokens=self.counts["prompt"], generation_tokens=self.counts["gen"],
                                   finished=dict(self.finished), expert_tokens={k: list(v) for k, v in self.expert.items()})

    def _end(self, request, on_event, reason, n=0):
        from moelab.serve.types import StreamEvent

        self.finished[reason] = self.finished.get(reason, 0) + 1
        on_event(StreamEvent(request.request_id, [], "", finish_reason=reason, prompt_tokens=len(request.prompt_ids),
                             completion_tokens=n))

    def _loop(self):
        from moelab.infer.generate import generate
        from moelab.serve.types import StreamEvent

        while True:
            with self.cv:
                while not self.queue and not self.closed:
                    self.cv.wait()
                if not self.queue:
                    return
                request, on_event = self.queue.popleft()
                if request.request_id in self.aborted:
                    self._end(request, on_event, self.aborted[request.request_id])
                    continue
                self.running, self.running_id = 1, request.request_id
            n = [0]
            pending: list = []  # the last stream call, held: generate's final flush repeats the last token

            def stream(row, token, delta, request=request, on_event=on_event, n=n, pending=pending):
                if request.request_id in self.aborted:
                    raise _Abort
                if pending and not request.return_routing:
                    on_event(pending.pop())
                n[0] += 1
                pending.append(StreamEvent(request.request_id, [token], delta, prompt_tokens=len(request.prompt_ids),
                                           completion_tokens=n[0]))

            self.counts["prompt"] += len(request.prompt_ids)
            try:
                res = generate(self.model, [list(request.prompt_ids)], max_new_tokens=request.max_tokens,
                               temperature=request.temperature, top_k=request.top_k, top_p=request.top_p,
                               seed=request.seed, stop_token_ids=request.stop_token_ids,
                               stop_strings=list(request.stop) or None, tokenizer=self.tokenizer,
                               record_routing=True, stream=stream)
                if n[0] > len(res.token_ids[0]):  # the flush: text only
                    pending[-1].token_ids, n[0] = [], n[0] - 1
                    pending[-1].completion_tokens = n[0]
                routes = iter(res.routing[0])
                for ev in pending:  # with return_routing all events were held until now
                    if request.return_routing:
                        ev.routing = [next(routes).to_dict() for _ in ev.token_ids]
                    on_event(ev)
                self.counts["steps"] += n[0]
                self.counts["gen"] += n[0]
                for tr in res.routing[0]:
                    for layer, experts in tr.experts.items():
                        counts = self.expert.setdefault(layer, [0] * self.model.cfg.moe.num_experts)
                        for e in experts:
                            counts[e] += 1
                reason = {"stop_token": "stop", "stop_string": "stop"}.get(res.finish_reasons[0], "length")
            except _Abort:
                reason = self.aborted[request.request_id]
            with self.cv:
                self.running, self.running_id = 0, None
                self._end(request, on_event, reason, n[0])


def start_server(engine, tokenizer, *, api_key=None, chat_template=None, drain_timeout_s=10.0) -> Running:
    from moelab.serve.app import create_app
    from moelab.serve.server import make_server

    app = create_app(engine, tokenizer, MODEL_NAME, api_key=api_key, chat_template=chat_template,
                     drain_timeout_s=drain_timeout_s)
    port = free_port()
    server = make_server(app, host="127.0.0.1", port=port, log_level="warning", graceful_s=2)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    return Running(f"http://127.0.0.1:{port}", engine, app, server, thread)


@pytest.fixture(scope="module")
def server(model, tokenizer):
    """A server with 4 slots on the tiny model, no API key."""
    run = start_server(make_engine(model, tokenizer, max_num_seqs=4, max_len=MAX_LEN), tokenizer)
    yield run
    run.stop()


@pytest.fixture()
def slow_model(model):
    """The tiny model, 20 ms slower per forward (so a request holds its slot long enough to test)."""
    handle = model.register_forward_pre_hook(lambda *_: time.sleep(0.02))
    yield model
    handle.remove()


@pytest.fixture()
def one_slot(slow_model, tokenizer):
    """One slot, one waiting place, a slow model."""
    run = start_server(make_engine(slow_model, tokenizer, max_num_seqs=1, max_queue=1, max_len=MAX_LEN), tokenizer,
                       drain_timeout_s=2.0)
    yield run
    run.stop()


def wait_until(cond, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
