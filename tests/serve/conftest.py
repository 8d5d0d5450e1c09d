"""A tiny model and tokenizer, and real uvicorn servers in background threads.

The model is a random transformers Mixtral (imported with `moelab.hf.from_pretrained`)
whose vocab is that of a byte-level BPE trained on a few sentences. Servers run
`moelab.serve.server.Server` on 127.0.0.1 at a free port in a thread; every fixture shuts
its server down (which drains the engine) and joins the thread.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pytest
import torch

from moelab.dist.launch import free_port

transformers = pytest.importorskip("transformers")
pytest.importorskip("fastapi")
pytest.importorskip("openai")

MAX_LEN = 256
MODEL_NAME = "tiny-moe"
KEY = "sk-test-key"
LONG_TOKENS = 120  # a request that holds its slot for ~2.4 s on `slow_model`

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


def save_tiny_mixtral(tokenizer, folder, max_len: int = MAX_LEN):
    """The random tiny Mixtral (4 experts, top 2) with large weights -- logits far from ties,
    so greedy tokens do not hang on the last bits -- saved as a Hugging Face folder."""
    cfg = transformers.MixtralConfig(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_len, bos_token_id=None,
        eos_token_id=None, pad_token_id=None, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.normal_(1, 0.2)
    hf.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def model(tokenizer, tmp_path_factory):
    from moelab.hf import from_pretrained

    return from_pretrained(save_tiny_mixtral(tokenizer, tmp_path_factory.mktemp("tiny-mixtral")))


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
    from moelab.serve.engine import Engine, EngineConfig

    return Engine(model, EngineConfig(**config), tokenizer=tokenizer)


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
    """A server with 4 slots on the tiny model, no API key; a step budget of 16 tokens, so
    longer prompts are prefilled in chunks over several steps."""
    run = start_server(make_engine(model, tokenizer, max_num_seqs=4, max_batch_tokens=16, max_len=MAX_LEN), tokenizer)
    yield run
    run.stop()


@pytest.fixture(scope="session")
def long_prompt(model, tokenizer) -> list[int]:
    """A prompt whose greedy continuation runs LONG_TOKENS tokens without an end token (the random
    model may write one early), so a request on it holds its slot for the whole test."""
    from moelab.data.tokenizer import end_token_ids
    from moelab.infer.generate import generate

    stop = end_token_ids(tokenizer)
    for start in range(10, 74):  # one at a time: a row that writes an end token stops early
        prompt = [start, start + 1, start + 2]
        if generate(model, [prompt], max_new_tokens=LONG_TOKENS, temperature=0, stop_token_ids=stop).finish_reasons[0] == "length":
            return prompt
    raise AssertionError(f"no prompt of the tiny model runs {LONG_TOKENS} tokens without an end token")


@pytest.fixture()
def slow_model(model, long_prompt):
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
