"""Export back to Hugging Face for the families moelab imports but cannot describe from its
own config (DeepSeek-V2/V3, gpt-oss, GLM-4.5, Llama 4, dots1, Granite, ERNIE, Hunyuan):
through the config.json recorded at import, into transformers' own layout. The round trip
HF -> moelab run -> HF gives transformers the very tensors it started from."""

from __future__ import annotations

import json

import pytest
import torch

from moelab.cli.main import main
from moelab.errors import CheckpointError

from .test_hf_families import FAMILIES, _ids, random_model

transformers = pytest.importorskip("transformers")

ROUND_TRIP = [f for f in FAMILIES if not f.endswith("-yarn")] + ["deepseek_v3-yarn", "gpt_oss-yarn"]


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_hf_to_moelab_to_hf_gives_transformers_the_same_model(tmp_path, capsys, name):
    hf = random_model(name)
    hf.save_pretrained(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), "--to-moelab", str(tmp_path / "run")]) == 0
    assert main(["convert", str(tmp_path / "run"), "--to-hf", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    back, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    back.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    want, got = hf.state_dict(), back.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    ids = _ids()
    with torch.no_grad():  # the same tensors and config: only the float summation order may differ
        assert (back(ids).logits - hf(ids).logits).abs().max().item() <= 1e-5


def test_a_changed_model_is_not_exported_under_its_old_config(tmp_path):
    from moelab.hf import export_hf, load_hf
    from moelab.hf.loader import read_hf_config

    hf = random_model("deepseek_v3")
    hf.save_pretrained(tmp_path / "hf")
    imp = load_hf(tmp_path / "hf")
    recorded = read_hf_config(tmp_path / "hf")
    recorded["num_hidden_layers"] = 5  # no longer this model
    with pytest.raises(CheckpointError, match="ModelConfig.n_layers differs from the config.json"):
        export_hf(imp.model, tmp_path / "out", hf_config=recorded)
    assert not (tmp_path / "out").exists()


def test_without_a_recorded_config_the_feature_is_named(tmp_path, capsys):
    hf = random_model("gpt_oss")
    hf.save_pretrained(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), "--to-moelab", str(tmp_path / "run")]) == 0
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    del cfg["source"]["hf_config"]  # a run converted before the config was recorded
    (tmp_path / "run" / "config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "run"), "--to-hf", str(tmp_path / "out"), "--no-verify"]) == 2
    assert "attn_sinks" in capsys.readouterr().err
