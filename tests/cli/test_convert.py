"""`moelab convert` both ways, through the CLI entry point."""

from __future__ import annotations

import pytest
import torch

from moelab.cli.convert import parse_size
from moelab.cli.main import main
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
