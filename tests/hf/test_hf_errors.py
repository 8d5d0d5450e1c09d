"""Bad checkpoints give one clear error naming the file and the tensor."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from moelab.errors import CheckpointError, ConfigError
from moelab.hf import from_pretrained


def _edit_weights(folder, fn):
    path = folder / "model.safetensors"
    sd = load_file(str(path))
    fn(sd)
    save_file(sd, str(path), metadata={"format": "pt"})


def test_missing_tensor_is_named(save_hf):
    _, folder = save_hf("mixtral")
    name = "model.layers.1.self_attn.k_proj.weight"
    _edit_weights(folder, lambda sd: sd.pop(name))
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        from_pretrained(folder)


def test_missing_expert_is_named(save_hf):
    _, folder = save_hf("olmoe")
    name = "model.layers.0.mlp.experts.2.up_proj.weight"
    _edit_weights(folder, lambda sd: sd.pop(name))
    with pytest.raises(CheckpointError, match=r"experts\.2\.up_proj"):
        from_pretrained(folder)


def test_shape_mismatch_names_tensor_and_file(save_hf):
    _, folder = save_hf("qwen3_moe")
    name = "model.layers.0.self_attn.q_norm.weight"
    _edit_weights(folder, lambda sd: sd.__setitem__(name, torch.ones(7)))
    with pytest.raises(CheckpointError) as e:
        from_pretrained(folder)
    assert name in str(e.value) and "model.safetensors" in str(e.value) and "(7,)" in str(e.value)


def test_unexpected_tensor_is_refused(save_hf):
    _, folder = save_hf("mixtral")
    _edit_weights(folder, lambda sd: sd.__setitem__("model.layers.0.self_attn.o_proj.bias", torch.zeros(32)))
    with pytest.raises(CheckpointError, match=r"o_proj\.bias"):
        from_pretrained(folder)


def test_unsupported_model_type(save_hf):
    _, folder = save_hf("mixtral")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "phimoe"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as e:
        from_pretrained(folder)
    assert "config.json" in str(e.value) and "'phimoe'" in str(e.value) and "mixtral" in str(e.value)


def test_unsupported_rope_scaling(save_hf):
    _, folder = save_hf("mixtral")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="yarn"):
        from_pretrained(folder)


@pytest.mark.parametrize("keep", [10, -100])
def test_truncated_file_is_named(save_hf, keep):
    _, folder = save_hf("mixtral")
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        from_pretrained(folder)


def test_missing_shard_is_named(save_hf):
    hf_model, folder = save_hf("mixtral")
    hf_model.save_pretrained(folder, max_shard_size="20KB")
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        from_pretrained(folder)


def test_not_a_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not a folder"):
        from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        from_pretrained(tmp_path / "empty")
