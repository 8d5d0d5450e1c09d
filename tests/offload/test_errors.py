"""Bad budgets, bad options and bad files: one clear error naming the field or file."""

from __future__ import annotations

import json
import re

import pytest
import torch

from moelab.errors import CheckpointError, ConfigError
from moelab.offload import ExpertStore, expert_layouts, load_offloaded
from moelab.rundir import save_model

from .conftest import EXPERT_BYTES, random_model, tiny_cfg


@pytest.mark.parametrize("scope, smallest", [("layer", 2 * EXPERT_BYTES), ("global", EXPERT_BYTES)])
def test_a_budget_below_one_expert_names_expert_memory_and_the_smallest_value(run, scope, smallest):
    _, run_dir = run
    with pytest.raises(ConfigError, match=rf"expert_memory={smallest - 1} bytes .* smallest allowed value is "
                                          rf"{smallest} bytes"):
        load_offloaded(run_dir, expert_memory=smallest - 1, scope=scope)
    load_offloaded(run_dir, expert_memory=smallest, scope=scope)  # exactly the minimum is fine


@pytest.mark.parametrize("kw, match", [
    (dict(expert_memory="2GB"), "expert_memory must be an integer"),
    (dict(expert_memory=10**9, policy="fifo"), "policy='fifo' .* allowed: lru, lfu"),
    (dict(expert_memory=10**9, scope="model"), "scope='model' .* allowed: layer, global"),
])
def test_bad_options(run, kw, match):
    with pytest.raises(ConfigError, match=match):
        load_offloaded(run[1], **kw)


def test_a_bf16_quantised_run_is_refused_naming_its_config(run, tmp_path):
    model, _ = run
    q = save_model(model, tmp_path / "q", quant={"format": "bf16", "group_size": None, "what": "experts",
                                                  "moelab_quant_version": 1})
    with pytest.raises(CheckpointError, match=re.escape(str(q / "config.json")) + ".*a bf16 run.*float, int8 and int4"):
        load_offloaded(q, expert_memory=10**9)
    (q / "config.json").write_text((q / "config.json").read_text().replace('"bf16"', '"int3"'))
    with pytest.raises(CheckpointError, match=r"\"quant\"\.format='int3' is not a format"):
        load_offloaded(q, expert_memory=10**9)


def test_a_hugging_face_folder_is_refused_with_the_convert_command(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    with pytest.raises(CheckpointError, match="moelab run directories only.*moelab convert"):
        load_offloaded(tmp_path, expert_memory=10**9)
    with pytest.raises(CheckpointError, match="no such file"):
        load_offloaded(tmp_path / "nowhere", expert_memory=10**9)


def test_a_dense_model_has_nothing_to_offload(tmp_path):
    run_dir = save_model(random_model(tiny_cfg().with_(moe=None)), tmp_path / "dense")
    with pytest.raises(ConfigError, match="no MoE layers"):
        load_offloaded(run_dir, expert_memory=10**9)


def test_a_truncated_file_names_the_file(run, tmp_path):
    model, run_dir = run
    data = (run_dir / "model.safetensors").read_bytes()
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=re.escape(str(bad)) + ".*truncated"):
        ExpertStore(bad, expert_layouts(model), expert_memory=10**9)
    bad.write_bytes(b"\x00" * 4)
    with pytest.raises(CheckpointError, match=re.escape(str(bad)) + ".*not a readable safetensors"):
        ExpertStore(bad, expert_layouts(model), expert_memory=10**9)


def test_experts_of_another_shape_name_the_tensor(run, tmp_path):
    model, _ = run
    other = save_model(random_model(tiny_cfg(d_expert=8)), tmp_path / "other")
    with pytest.raises(CheckpointError, match=r"tensor 'layers.1.mlp.experts.gate_up_proj' has shape \(4, 16, 32\)"):
        ExpertStore(other / "model.safetensors", expert_layouts(model), expert_memory=10**9)


def test_training_through_offloaded_experts_is_refused(run):
    off = load_offloaded(run[1], expert_memory=2 * EXPERT_BYTES)
    ids = torch.tensor([[1, 2, 3]])
    off.model.embed_tokens.weight.requires_grad_(True)
    with pytest.raises(ConfigError, match="inference-only"):
        off.model(ids, telemetry=False)
