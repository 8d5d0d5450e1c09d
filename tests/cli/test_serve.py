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
    assert "max_num_seqs" in err and err.count("\n") == 1
