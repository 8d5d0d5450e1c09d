"""Playground fixtures: a tiny trained-shape MoE run with its tokenizer, the app in a test
client, and a real uvicorn server in a thread (for the browser tests).

The model is random (routing is what the Route panel shows, not quality); Break runs use
the playground's "tiny" scale, trained by the real worker subprocess.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from moelab.dist.launch import free_port

pytest.importorskip("fastapi")

SENTENCES = ["The quick brown fox jumps over the lazy dog.",
             "Mixture of experts models route each token to a few experts.",
             "A router picks the top k experts for every token in the batch."] * 4


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A moelab run directory (config, weights, tokenizer) of a random 4-expert top-2 model,
    under a folder of its own (the server's --models folder)."""
    import torch

    from moelab.data.tokenizer import save_tokenizer, train_tokenizer
    from moelab.hf import save_moelab
    from moelab.model import ModelConfig, Transformer
    from moelab.moe import MoEConfig

    root = tmp_path_factory.mktemp("models")
    tok = train_tokenizer(SENTENCES, vocab_size=300)
    tok_path = save_tokenizer(tok, root / "tokenizer.json")
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64,
                      max_seq_len=128, moe=MoEConfig(d_model=32, d_expert=32, num_experts=4, top_k=2))
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():  # larger router weights: tokens go to different experts
        for moe in model.moe_layers:
            moe.router.weight.normal_(0, 1.0)
    return save_moelab(model, root / "tiny-run", tokenizer_path=tok_path)


@pytest.fixture(scope="session")
def hf_dir(model_dir) -> Path:
    """A tiny random Hugging Face Mixtral with the same tokenizer, beside the moelab run
    (an imported checkpoint for the Route panel); skipped without transformers."""
    import shutil

    import torch

    transformers = pytest.importorskip("transformers")
    vocab = json.loads((model_dir / "tokenizer.json").read_text())["model"]["vocab"]
    cfg = transformers.MixtralConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                     num_local_experts=4, num_experts_per_tok=2, bos_token_id=None,
                                     eos_token_id=None, pad_token_id=None)
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.normal_(1, 0.2)
    out = model_dir.parent / "hf-mixtral"
    model.save_pretrained(out)
    shutil.copy(model_dir / "tokenizer.json", out / "tokenizer.json")
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory, model_dir):
    """(app, config): runs folder fresh per module, model folder = the tiny run's parent."""
    from moelab.playground.app import create_app
    from moelab.playground.config import PlaygroundConfig

    cfg = PlaygroundConfig(runs_dir=tmp_path_factory.mktemp("pg-runs"), model_dirs=(model_dir.parent,), max_queue=2)
    app = create_app(cfg)
    yield app, cfg
    app.state.runs.shutdown(timeout=30)


@dataclass
class Live:
    url: str
    server: object
    thread: threading.Thread
    app: object
    config: object

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive(), "the playground server did not stop"


def start_live(app, cfg) -> Live:
    from moelab.playground.app import make_server

    port = free_port()
    server = make_server(app, host="127.0.0.1", port=port, log_level="warning")
    thread = threading.Thread(target=server.run, name=f"playground-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the playground server did not start"
        time.sleep(0.02)
    return Live(f"http://127.0.0.1:{port}", server, thread, app, cfg)


def wait_for(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.1)
