"""`moelab quantize` through the CLI entry point, then `moelab generate` on what it wrote."""

from __future__ import annotations

import json

import pytest
import torch

from moelab import rundir
from moelab.cli.main import main
from moelab.hf import load_any
from moelab.infer.generate import generate
from moelab.model import ModelConfig, Transformer
from moelab.moe import MoE, MoEConfig
from moelab.quant import QuantizedExperts, quantize_model

from .test_generate import _tokenizer


@pytest.fixture
def run(tmp_path):
    """A tiny float MoE run with a tokenizer (vocab 64)."""
    moe = MoEConfig(d_model=32, d_expert=32, num_experts=4, top_k=2)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=48, max_seq_len=64,
                      moe=moe)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    _tokenizer(tmp_path / "tokenizer.json")
    return rundir.save_model(model, tmp_path / "run", tokenizer_path=tmp_path / "tokenizer.json")


def test_quantize_int8_then_generate_gives_the_in_memory_tokens(run, tmp_path, capsys):
    out = tmp_path / "q8"
    assert main(["quantize", str(run), str(out), "--format", "int8"]) == 0
    line = capsys.readouterr().out
    assert line.count("\n") == 1 and "int8 experts in 2 MoE layers" in line and "->" in line
    assert (out / "tokenizer.json").is_file()

    reference = rundir.load_model(run).model
    quantize_model(reference, "int8")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    prompt = "the cat sat"
    ref = generate(reference, [tok.encode(prompt).ids], max_new_tokens=6, tokenizer=tok, stop_token_ids=[0])
    loaded = load_any(out)
    assert loaded.kind == "moelab-int8"
    assert generate(loaded.model, [tok.encode(prompt).ids], max_new_tokens=6, stop_token_ids=[0]).token_ids == ref.token_ids
    assert main(["generate", str(out), "--prompt", prompt, "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == prompt + ref.texts[0] + "\n"


@pytest.mark.parametrize("fmt, extra", [("int4", ["--group-size", "32"]), ("bf16", [])])
def test_quantize_json_and_the_other_formats(run, tmp_path, capsys, fmt, extra):
    out = tmp_path / fmt
    assert main(["quantize", str(run), str(out), "--format", fmt, *extra, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == fmt and summary["moe_layers"] == 2
    assert summary["group_size"] == (32 if fmt == "int4" else None)
    assert summary["expert_bytes_after"] < summary["expert_bytes_before"]
    assert summary["file_bytes"] == (out / "model.safetensors").stat().st_size
    loaded = load_any(out)
    assert loaded.kind == f"moelab-{fmt}"
    experts = [m.experts for m in loaded.model.modules() if isinstance(m, MoE)]
    if fmt == "bf16":
        assert all(e.w_in.dtype == torch.bfloat16 and e.down_proj.dtype == torch.bfloat16 for e in experts)
    else:
        assert all(isinstance(e, QuantizedExperts) and e.fmt.group_size == 32 for e in experts)


@pytest.mark.parametrize("fmt, extra", [("int8", []), ("int4", ["--group-size", "32"])])
def test_quantize_what_all_quantises_the_other_linears_and_generates_the_same(run, tmp_path, capsys, fmt, extra):
    out = tmp_path / f"{fmt}-all"
    assert main(["quantize", str(run), str(out), "--format", fmt, *extra, "--what", "all", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    # 2 layers x (q, k, v, o) + the LM head; the routers stay float.
    assert summary["what"] == "all" and summary["linears"] == 9 and summary["linears_left_float"] == []
    assert summary["linear_bytes_after"] < summary["linear_bytes_before"] / 3
    assert json.loads((out / "config.json").read_text())["quant"]["what"] == "all"
    from moelab.quant import QuantFormat
    from moelab.quant.linear import QuantizedLinear

    reference = rundir.load_model(run).model
    quantize_model(reference, QuantFormat(name=fmt, group_size=32), what="all")
    loaded = load_any(out).model
    assert isinstance(loaded.lm_head, QuantizedLinear) and not isinstance(loaded.layers[0].mlp.router, QuantizedLinear)
    ids = [[1, 2, 3, 4]]
    assert generate(loaded, ids, max_new_tokens=6).token_ids == generate(reference, ids, max_new_tokens=6).token_ids


def test_quantize_head_format_int8_keeps_the_lm_head_in_int8(run, tmp_path, capsys):
    out = tmp_path / "int4-head8"
    argv = ["quantize", str(run), str(out), "--format", "int4", "--group-size", "32", "--what", "all"]
    assert main([*argv, "--head-format", "int8"]) == 0
    assert "the LM head in int8" in capsys.readouterr().out
    from moelab.quant import QuantFormat
    from moelab.quant.linear import QuantizedLinear

    loaded = load_any(out).model
    assert loaded.lm_head.fmt == QuantFormat(name="int8")
    assert isinstance(loaded.layers[0].self_attn.q_proj, QuantizedLinear)
    assert loaded.layers[0].self_attn.q_proj.fmt == QuantFormat(name="int4", group_size=32)
    reference = rundir.load_model(run).model
    quantize_model(reference, QuantFormat(name="int4", group_size=32), what="all", head="int8")
    ids = [[1, 2, 3, 4]]
    assert generate(loaded, ids, max_new_tokens=6).token_ids == generate(reference, ids, max_new_tokens=6).token_ids


def test_quantize_a_hugging_face_folder(save_hf, tmp_path, capsys):
    _, folder = save_hf("mixtral")
    assert main(["quantize", str(folder), str(tmp_path / "q"), "--format", "int8"]) == 0
    loaded = load_any(tmp_path / "q")
    assert loaded.kind == "moelab-int8"
    assert json.loads((tmp_path / "q" / "config.json").read_text())["source"]["kind"] == "mixtral"


@pytest.mark.parametrize("argv, words", [
    (["--format", "bf16", "--what", "all"], ["--what all --format bf16", "--dtype bf16"]),
    (["--format", "int8", "--what", "attention"], ["--what 'attention'"]),
    (["--format", "int8", "--group-size", "32"], ["--group-size", "int4 only"]),
    (["--format", "int4", "--group-size", "48"], ["--group-size 48", "not allowed"]),
    (["--format", "int4"], ["--group-size 128", "does not divide"]),  # the default group vs d_model 32
    (["--format", "int8", "--what", "all", "--head-format", "int8"], ["--head-format needs --format int4 --what all",
                                                                     "got --format int8"]),
    (["--format", "int4", "--group-size", "32", "--head-format", "int8"], ["--what experts"]),
    (["--format", "int4", "--what", "all", "--head-format", "int4"], ["--head-format 'int4'", "allowed: int8"]),
])
def test_bad_flags_are_one_line_naming_the_flag(run, tmp_path, capsys, argv, words):
    assert main(["quantize", str(run), str(tmp_path / "q"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(w in err for w in words), err
    assert not (tmp_path / "q").exists()


def test_bad_inputs_and_overwrite(run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "q"
    assert main(["quantize", str(tmp_path / "nope"), str(out), "--format", "int8"]) == 2
    assert "nope: no such file or folder" in capsys.readouterr().err
    assert main(["quantize", str(run), str(run), "--format", "int8"]) == 2
    assert "is SRC" in capsys.readouterr().err

    assert main(["quantize", str(run), str(out), "--format", "int8"]) == 0
    capsys.readouterr()
    assert main(["quantize", str(run), str(out), "--format", "int4", "--group-size", "32"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{out}: exists and is not empty" in err and "--overwrite" in err
    assert main(["quantize", str(out), str(tmp_path / "q2"), "--format", "int8"]) == 2
    assert "already quantised (moelab-int8)" in capsys.readouterr().err
    assert main(["quantize", str(run), str(out), "--format", "int4", "--group-size", "32", "--overwrite"]) == 0
    assert load_any(out).kind == "moelab-int4"

    # a failed write leaves neither a new OUT nor a temp folder, and an old OUT intact
    def fail(model, path, *, metadata=None):
        raise OSError("disk full")

    monkeypatch.setattr(rundir.weights, "save_weights", fail)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["quantize", str(run), str(tmp_path / "q3"), "--format", "int8"]) == 2
    assert main(["quantize", str(run), str(out), "--format", "int8", "--overwrite"]) == 2
    assert capsys.readouterr().err.count("disk full") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert load_any(out).kind == "moelab-int4"
