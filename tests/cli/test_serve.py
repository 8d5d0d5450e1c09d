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


def moelab_run(tmp_path, d_expert: int = 16):
    """A tiny random moelab run (4 experts) and a tokenizer.json beside it."""
    import torch

    from moelab.data.tokenizer import train_tokenizer
    from moelab.model import ModelConfig, Transformer
    from moelab.moe import MoEConfig
    from moelab.rundir import save_model

    tok = train_tokenizer(["hello world, hello experts"] * 8, vocab_size=300)
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=48,
                      max_seq_len=64, moe=MoEConfig(d_model=32, d_expert=d_expert, num_experts=4, top_k=2))
    torch.manual_seed(0)
    run = save_model(Transformer(cfg), tmp_path / "run")
    tok.save(str(tmp_path / "tokenizer.json"))
    return run


def test_serve_expert_memory_offloads_a_moelab_run(tmp_path, monkeypatch):
    from moelab.offload import OffloadedExperts
    from moelab.serve.server import Server

    run = moelab_run(tmp_path)
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


def test_serve_ep_refuses_expert_memory_by_name(hf_folder, capsys):
    assert main(["serve", str(hf_folder), "--ep", "2", "--nproc", "2", "--expert-memory", "1MB"]) == 2
    err = capsys.readouterr().err
    assert "--expert-memory" in err and "--ep" in err and err.count("\n") == 1


@pytest.fixture
def one_rank(monkeypatch):
    """This process as rank 0 of a world of 1 (what `--nproc 1` gives each rank)."""
    from moelab.dist.launch import free_port

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))


def test_serve_ep_rank0_serves_through_the_plan_broadcaster(hf_folder, monkeypatch, one_rank, capsys):
    from moelab.dist.dispatcher import AllToAllDispatcher
    from moelab.serve.ep import PlanBroadcaster
    from moelab.serve.server import Server

    seen = {}
    monkeypatch.setattr(Server, "run", lambda self: seen.update(app=self.config.app))
    assert main(["serve", str(hf_folder), "--ep", "1", "--max-len", "64"]) == 0
    engine = seen["app"].state.moelab.engine
    assert isinstance(engine.executor, PlanBroadcaster)
    assert all(isinstance(m.dispatcher, AllToAllDispatcher) for m in engine.model.moe_layers)
    assert "[expert parallel: 1 ranks" in capsys.readouterr().err


def test_serve_ep_refuses_quantised_experts_by_name(tmp_path, one_rank, capsys):
    run = moelab_run(tmp_path, d_expert=32)
    assert main(["quantize", str(run), str(tmp_path / "q"), "--format", "int8"]) == 0
    capsys.readouterr()
    assert main(["serve", str(tmp_path / "q"), "--ep", "1", "--tokenizer", str(tmp_path / "tokenizer.json")]) == 2
    err = capsys.readouterr().err
    assert "--ep" in err and "quantised" in err and err.count("\n") == 1, err
