"""`moelab serve`: the CLI builds engine and app from a checkpoint folder (the server's
behaviour is tested in tests/serve)."""

from __future__ import annotations

import json

import pytest

from moelab.cli.main import main

from .conftest import make_hf

pytest.importorskip("fastapi")


@pytest.fixture
def hf_folder(tmp_path):
    from moelab.data.tokenizer import train_tokenizer

    tok = train_tokenizer(["hello world, hello experts"] * 8, vocab_size=300)
    out = tmp_path / "tiny"
    make_hf(vocab_size=tok.get_vocab_size(), max_positions=128).save_pretrained(out)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages[0]['content'] }}"}))
    return out


def test_serve_builds_the_app(hf_folder, monkeypatch):
    from moelab.serve.server import Server

    seen = {}
    monkeypatch.setattr(Server, "run", lambda self: seen.update(app=self.config.app, host=self.config.host,
                                                                port=self.config.port))
    monkeypatch.setenv("MOELAB_API_KEY", "from-env")
    assert main(["serve", str(hf_folder), "--port", "8123", "--max-num-seqs", "2", "--max-len", "64",
                 "--served-model-name", "tiny"]) == 0
    st = seen["app"].state.moelab
    assert (seen["host"], seen["port"]) == ("127.0.0.1", 8123)
    assert st.model_name == "tiny" and st.api_key == "from-env" and not st.chat_template.is_plain
    assert st.engine.max_len == 64 and st.engine.config.max_num_seqs == 2


def test_serve_bad_engine_flag_is_one_line(hf_folder, capsys):
    assert main(["serve", str(hf_folder), "--max-num-seqs", "0"]) == 2
    err = capsys.readouterr().err
    assert "--max-num-seqs" in err and err.count("\n") == 1


def test_serve_expert_memory_offloads_a_moelab_run(tmp_path, monkeypatch):
    import torch

    from moelab.data.tokenizer import train_tokenizer
    from moelab.model import ModelConfig, Transformer
    from moelab.moe import MoEConfig
    from moelab.offload import OffloadedExperts
    from moelab.rundir import save_model
    from moelab.serve.server import Server

    tok = train_tokenizer(["hello world, hello experts"] * 8, vocab_size=300)
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=48,
                      max_seq_len=64, moe=MoEConfig(d_model=32, d_expert=16, num_experts=4, top_k=2))
    torch.manual_seed(0)
    run = save_model(Transformer(cfg), tmp_path / "run")
    tok.save(str(tmp_path / "tokenizer.json"))
    seen = {}
    monkeypatch.setattr(Server, "run", lambda self: seen.update(app=self.config.app))
    assert main(["serve", str(run), "--tokenizer", str(tmp_path / "tokenizer.json"), "--expert-memory", "20KiB"]) == 0
    st = seen["app"].state.moelab
    assert all(isinstance(m.experts, OffloadedExperts) for m in st.engine.model.moe_layers)
    assert b"moelab_serve_offload_misses_total" in st.metrics.render()
    assert main(["serve", str(run), "--expert-memory", "lots"]) == 2


def test_serve_dtype_bf16_casts_the_model(hf_folder, monkeypatch):
    import torch

    from moelab.serve.server import Server

    seen = {}
    monkeypatch.setattr(Server, "run", lambda self: seen.update(app=self.config.app))
    assert main(["serve", str(hf_folder), "--dtype", "bfloat16", "--max-len", "64"]) == 0
    engine = seen["app"].state.moelab.engine
    assert engine.model.embed_tokens.weight.dtype == torch.bfloat16 and engine.cache.k[0].dtype == torch.bfloat16
    with pytest.raises(SystemExit) as e:  # an argparse usage error: one line, exit 2
        main(["serve", str(hf_folder), "--dtype", "int3"])
    assert e.value.code == 2
