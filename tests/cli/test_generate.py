"""`moelab generate` on a converted checkpoint with a real tokenizer."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from moelab.cli.main import main
from moelab.hf import load_hf, save_moelab
from moelab.infer.generate import generate

from .conftest import make_hf


def _tokenizer(path):
    words = "the a cat dog sat on mat and ran".split()
    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    vocab.update({f"w{i}": i for i in range(len(vocab), 64)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(path))
    return tok


def test_generate_cli_streams_and_records_routing(tmp_path, capsys):
    hf = make_hf("mixtral", seed=1)
    hf.save_pretrained(tmp_path / "hf")
    tok = _tokenizer(tmp_path / "hf" / "tokenizer.json")
    imp = load_hf(tmp_path / "hf")
    save_moelab(imp.model, tmp_path / "run", tokenizer_path=imp.tokenizer_path)
    rc = main(["generate", str(tmp_path / "run"), "--prompt", "the cat sat", "--max-new-tokens", "6",
               "--record-routing", str(tmp_path / "routing.json")])
    assert rc == 0
    out = capsys.readouterr().out
    ref = generate(imp.model, [tok.encode("the cat sat").ids], max_new_tokens=6, tokenizer=tok, stop_token_ids=[0])
    assert out == "the cat sat" + ref.texts[0] + "\n"
    rec = json.loads((tmp_path / "routing.json").read_text())
    row = rec["prompts"][0]
    assert row["token_ids"] == ref.token_ids[0] and len(row["routing"]) == len(ref.token_ids[0])
    assert set(row["routing"][0]) == {"0", "1"} and len(row["routing"][0]["0"]["experts"]) == 2
    # the HF folder works directly too, and several prompts are batched
    assert main(["generate", str(tmp_path / "hf"), "--prompt", "a dog", "--prompt", "the mat and",
                 "--max-new-tokens", "3", "--temperature", "0.8", "--seed", "0"]) == 0
    assert capsys.readouterr().out.count("---") == 2


def test_generate_cli_needs_tokenizer(tmp_path, capsys):
    make_hf("mixtral").save_pretrained(tmp_path / "hf")
    assert main(["generate", str(tmp_path / "hf"), "--prompt", "x"]) == 2
    assert "--tokenizer" in capsys.readouterr().err


def test_generate_cli_compile_refuses_record_routing(tmp_path, capsys):
    make_hf("mixtral").save_pretrained(tmp_path / "hf")
    _tokenizer(tmp_path / "hf" / "tokenizer.json")
    assert main(["generate", str(tmp_path / "hf"), "--prompt", "the cat", "--compile",
                 "--record-routing", str(tmp_path / "r.json")]) == 2
    captured = capsys.readouterr()
    assert "--compile does not record routing" in captured.err and captured.out == ""  # refused before the prompt


def _tiny_run(tmp_path):
    hf = make_hf("mixtral", seed=1)
    hf.save_pretrained(tmp_path / "hf")
    _tokenizer(tmp_path / "hf" / "tokenizer.json")
    imp = load_hf(tmp_path / "hf")
    return save_moelab(imp.model, tmp_path / "run", tokenizer_path=imp.tokenizer_path)



@pytest.mark.parametrize(("flags", "needle"), [
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--top-k", "0"], "--top-k must be >= 1"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--device", "tpu"], "--device"),
])
def test_generate_validates_flags_before_printing_the_prompt(tmp_path, capsys, flags, needle):
    run = _tiny_run(tmp_path)
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "the cat", *flags]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and needle in captured.err


@pytest.mark.parametrize("dtype", ["bf16", "bfloat16"])
def test_generate_takes_device_and_dtype(tmp_path, capsys, dtype):
    run = _tiny_run(tmp_path)
    assert main(["generate", str(run), "--prompt", "the cat", "--max-new-tokens", "3", "--device", "cpu",
                 "--dtype", dtype]) == 0
    assert capsys.readouterr().out.startswith("the cat")
