"""`moelab convert` both ways, through the CLI entry point."""

from __future__ import annotations

import pytest
import torch

from moelab.cli.main import main
from moelab.cli.options import parse_size
from moelab.errors import ConfigError
from moelab.hf import from_pretrained, load_moelab

transformers = pytest.importorskip("transformers")


def test_convert_round_trip(save_hf, tmp_path, capsys):
    hf_model, folder = save_hf("mixtral")
    assert main(["convert", str(folder), "--to-moelab", str(tmp_path / "run")]) == 0
    loaded = load_moelab(tmp_path / "run")
    ids = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        ref = hf_model(ids).logits
    assert (loaded.model(ids).logits - ref).abs().max() <= 1e-4
    assert main(["convert", str(tmp_path / "run" / "model.safetensors"), "--to-hf", str(tmp_path / "hf"),
                 "--max-shard-size", "30KB"]) == 0
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert (back(ids).logits - ref).abs().max() <= 1e-4
    assert torch.equal(from_pretrained(tmp_path / "hf")(ids).logits, loaded.model(ids).logits)


def test_convert_errors_are_one_line(tmp_path, capsys):
    assert main(["convert", str(tmp_path), "--to-moelab", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config.json" in err


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("64KiB") == 65536 and parse_size("100") == 100
    with pytest.raises(ConfigError, match="max-shard-size"):
        parse_size("lots")


@pytest.fixture
def gguf_run(tmp_path):
    """A tiny float MoE run (vocab 320) with a byte-level BPE tokenizer of 300 tokens."""
    pytest.importorskip("gguf")
    from moelab import rundir
    from moelab.data.tokenizer import save_tokenizer, train_tokenizer
    from moelab.model import ModelConfig, Transformer
    from moelab.moe import MoEConfig

    tok = save_tokenizer(train_tokenizer(["the quick brown fox jumps over the lazy dog. " * 30], vocab_size=300),
                         tmp_path / "tokenizer.json")
    cfg = ModelConfig(vocab_size=320, d_model=64, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=64,
                      moe=MoEConfig(d_model=64, d_expert=64, num_experts=4, top_k=2))
    torch.manual_seed(0)
    return rundir.save_model(Transformer(cfg).eval(), tmp_path / "run", tokenizer_path=tok)


def test_convert_to_gguf(gguf_run, tmp_path, capsys):
    from moelab.hf.gguf import read_gguf_tensors

    out = tmp_path / "m.gguf"
    assert main(["convert", str(gguf_run), "--to-gguf", str(out), "--type", "q8_0"]) == 0
    line = capsys.readouterr().out
    assert line.count("\n") == 1 and "wrote GGUF" in line and "16 q8_0" in line and "7 f32" in line
    tensors = read_gguf_tensors(out)
    assert tensors["blk.1.ffn_gate_exps.weight"][0].shape == (4, 64, 64)
    assert tensors["blk.1.ffn_gate_exps.weight"][1] == "q8_0" and tensors["blk.1.ffn_gate_inp.weight"][1] == "f32"

    assert main(["convert", str(gguf_run), "--to-gguf", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err
    assert main(["convert", str(gguf_run), "--to-gguf", str(out), "--overwrite"]) == 0  # default f32
    assert read_gguf_tensors(out)["blk.1.ffn_gate_exps.weight"][1] == "f32"


def test_convert_hf_folder_to_gguf(tmp_path, capsys):
    pytest.importorskip("gguf")
    from moelab.data.tokenizer import save_tokenizer, train_tokenizer
    from moelab.hf.gguf import read_gguf_tensors

    cfg = transformers.MixtralConfig(vocab_size=320, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=64)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "hf")
    tok = save_tokenizer(train_tokenizer(["a b c " * 30], vocab_size=300), tmp_path / "tokenizer.json")
    assert main(["convert", str(tmp_path / "hf"), "--to-gguf", str(tmp_path / "m.gguf"), "--tokenizer", str(tok)]) == 0
    assert len(read_gguf_tensors(tmp_path / "m.gguf")) == 3 + 10


@pytest.mark.parametrize(("argv", "needle"), [
    (["--to-hf", "OUT", "--type", "q8_0"], "--type does not apply to --to-hf"),
    (["--to-gguf", "OUT", "--dtype", "bfloat16"], "--dtype does not apply to --to-gguf"),
    (["--to-gguf", "OUT", "--max-shard-size", "1GB"], "--max-shard-size does not apply to --to-gguf"),
    (["--to-moelab", "OUT", "--max-shard-size", "1GB"], "--max-shard-size does not apply to --to-moelab"),
    (["--to-moelab", "OUT", "--type", "f16"], "--type does not apply to --to-moelab"),
    (["--to-moelab", "OUT", "--no-verify"], "--no-verify does not apply to --to-moelab"),
])
def test_convert_refuses_flags_the_target_ignores(tmp_path, capsys, argv, needle):
    argv = [a.replace("OUT", str(tmp_path / "out")) for a in argv]
    assert main(["convert", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err
    assert not (tmp_path / "out").exists()


def test_convert_refuses_a_quantised_run_to_gguf(gguf_run, tmp_path, capsys):
    assert main(["quantize", str(gguf_run), str(tmp_path / "q8"), "--format", "int8"]) == 0
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "q8"), "--to-gguf", str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "quantised moelab run (moelab-int8)" in err
    assert not (tmp_path / "m.gguf").exists()


def test_to_moelab_refuses_an_existing_run_without_overwrite(save_hf, tmp_path, capsys):
    _, folder = save_hf("mixtral")
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text('{"format": "moelab-run"}')
    (out / "optimizer.safetensors").write_bytes(b"trained state")
    capsys.readouterr()  # save_pretrained's progress bar
    assert main(["convert", str(folder), "--to-moelab", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err and str(out) in err
    assert (out / "optimizer.safetensors").read_bytes() == b"trained state"  # untouched
    # --overwrite replaces the whole folder: nothing of the old run is left beside the new one
    assert main(["convert", str(folder), "--to-moelab", str(out), "--overwrite"]) == 0
    assert not (out / "optimizer.safetensors").exists()
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    load_moelab(out)
    # a folder that is not a moelab run is never replaced, even with --overwrite
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    assert main(["convert", str(folder), "--to-moelab", str(other), "--overwrite"]) == 2
    assert (other / "todo.txt").read_text() == "keep me"


def test_to_moelab_honours_dtype(save_hf, tmp_path):
    from safetensors import safe_open

    _, folder = save_hf("mixtral")
    assert main(["convert", str(folder), "--to-moelab", str(tmp_path / "fp32")]) == 0
    assert main(["convert", str(folder), "--to-moelab", str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    ratio = (tmp_path / "bf16" / "model.safetensors").stat().st_size / (tmp_path / "fp32" / "model.safetensors").stat().st_size
    assert 0.45 < ratio < 0.55
    assert load_moelab(tmp_path / "bf16").model is not None

