"""Quantised run directories: `save_quantized` -> `load_quantized` bit for bit, and every
way a quantised run on disk can be wrong gives one `CheckpointError` naming file and field."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moelab import rundir
from moelab.errors import CheckpointError, ConfigError
from moelab.hf import load_any
from moelab.model import ModelConfig, Transformer
from moelab.moe import MoE, MoEConfig, RoutedExperts
from moelab.quant import (
    QuantFormat,
    QuantizedExperts,
    load_quantized,
    quantize_model,
    save_quantized,
)

V = 64
FORMATS = {"int8": "int8", "int4": QuantFormat(name="int4", group_size=32), "bf16": "bf16"}


def _model(seed: int = 0) -> Transformer:
    # d_expert = d_model = 32: the smallest int4 group (32) divides both.
    moe = MoEConfig(d_model=32, d_expert=32, num_experts=4, top_k=2)
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=48, max_seq_len=64,
                      moe=moe)
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for t in model.parameters():
            t.normal_(0, 0.3)
    return model


def _quantized(fmt, seed: int = 0) -> Transformer:
    model = _model(seed)
    quantize_model(model, fmt)
    return model


@pytest.fixture
def int8_run(tmp_path):
    model = _quantized("int8")
    return model, save_quantized(model, tmp_path / "q8", fmt="int8")


def _logits(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids, telemetry=False).logits


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_round_trip_is_bit_for_bit(tmp_path, name):
    fmt = FORMATS[name]
    model = _quantized(fmt)
    out = save_quantized(model, tmp_path / "q", fmt=fmt)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["format"] == "moelab-run"
    assert cfg["quant"] == {"format": name, "group_size": 32 if name == "int4" else None, "what": "experts",
                            "moelab_quant_version": 2}
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["moelab_quant"] == name
        keys = set(f.keys())
    if name == "bf16":
        assert "layers.0.mlp.experts.gate_up_proj" in keys
    else:
        assert {"layers.1.mlp.experts.gate_up_proj_qweight", "layers.1.mlp.experts.down_proj_scale"} <= keys
        assert ("layers.1.mlp.experts.down_proj_zero" in keys) == (name == "int4")

    loaded = load_quantized(out)
    assert loaded.kind == f"moelab-{name}" and not loaded.model.training and loaded.config == model.cfg
    want, got = model.state_dict(), loaded.model.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    for moe in (m for m in loaded.model.modules() if isinstance(m, MoE)):
        if name == "bf16":
            assert isinstance(moe.experts, RoutedExperts) and moe.experts.w_in.dtype == torch.bfloat16
        else:
            assert isinstance(moe.experts, QuantizedExperts) and moe.experts.fmt == QuantFormat(
                name=name, group_size=fmt.group_size if name == "int4" else 128)
    ids = torch.randint(0, V, (2, 9))
    assert torch.equal(_logits(loaded.model, ids), _logits(model, ids))


def test_load_any_loads_it_and_rundir_refuses_it(int8_run):
    model, run = int8_run
    with pytest.raises(CheckpointError, match=r"config\.json: a quantised run .*load_any.*load_quantized"):
        rundir.load_model(run)
    with pytest.raises(CheckpointError, match="quantised run"):
        rundir.load_model(run / "model.safetensors")
    loaded = load_any(run)
    assert loaded.kind == "moelab-int8"
    ids = torch.randint(0, V, (1, 5))
    assert torch.equal(_logits(loaded.model, ids), _logits(model, ids))


def test_load_quantized_refuses_a_float_run(tmp_path):
    run = rundir.save_model(_model(), tmp_path / "float")
    with pytest.raises(CheckpointError, match="not a quantised run"):
        load_quantized(run)


def _edit_quant(run, **changes):
    path = run / "config.json"
    cfg = json.loads(path.read_text())
    cfg["quant"] = changes.pop("replace") if "replace" in changes else {**cfg["quant"], **changes}
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("edit, match", [
    (dict(replace={"format": "int3"}), r"\"quant\"\.format='int3' is not a format .*allowed: bf16, int8, int4"),
    (dict(replace="int8"), r"\"quant\" must be an object"),
    (dict(moelab_quant_version=4), r"\"quant\"\.moelab_quant_version=4 is not supported \(expected one of 1, 2, 3\)"),
    (dict(head="int8"), r"\"quant\"\.head is in a version-2 entry; it needs \"moelab_quant_version\": 3"),
    (dict(head="int8", moelab_quant_version=3), r"\"quant\"\.head='int8' needs int4 with what='all' \(got int8"),
    (dict(moelab_quant_version=True), r"\"quant\"\.moelab_quant_version=True"),
    (dict(what="everything"), r"\"quant\"\.what='everything'"),
    (dict(format="bf16", what="all"), r"\"quant\"\.what='all' with format bf16"),
    (dict(group_size=64), r"\"quant\"\.group_size=64, but only int4 has groups"),
    (dict(format="int4", group_size=48), r"\"quant\"\.group_size: .*group_size=48 is not allowed"),
    (dict(format="int4", group_size=64), r"\"quant\"\.group_size: .*does not divide the input dim"),
])
def test_a_bad_quant_entry_names_the_file_and_field(int8_run, edit, match):
    run = int8_run[1]
    _edit_quant(run, **edit)
    with pytest.raises(CheckpointError, match=match) as e:
        load_any(run)
    assert str(run / "config.json") in str(e.value)


def test_what_all_in_the_config_of_an_experts_only_file_is_refused(int8_run):
    run = int8_run[1]
    _edit_quant(run, what="all")
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*(missing|unexpected|dtype|shape)") as e:
        load_any(run)
    assert "lm_head" in str(e.value) or "q_proj" in str(e.value) or "qweight" in str(e.value)


def test_a_file_that_does_not_match_its_config(tmp_path, int8_run):
    """The structural checks behind the sha256 one (verify=False: each edit changes the bytes)."""
    run = int8_run[1]
    weights = run / "model.safetensors"
    tensors = load_file(str(weights))
    # a missing tensor
    name = "layers.0.mlp.experts.down_proj_scale"
    save_file({k: v for k, v in tensors.items() if k != name}, str(weights), metadata={"moelab_quant": "int8"})
    with pytest.raises(CheckpointError, match=rf"{weights}: tensor '{name}' is missing"):
        load_quantized(run, verify=False)
    # a tensor in the wrong dtype (same shape)
    save_file({**tensors, name: tensors[name].float()}, str(weights), metadata={"moelab_quant": "int8"})
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' is stored as F32, the model expects BF16"):
        load_quantized(run, verify=False)
    # the config says int4 with the int8 file
    save_file(tensors, str(weights), metadata={"moelab_quant": "int8"})
    _edit_quant(run, format="int4", group_size=32)
    with pytest.raises(CheckpointError, match=r"gate_up_proj_qweight' has shape \(4, 64, 32\), the model expects \(4, 64, 16\)"):
        load_quantized(run, verify=False)
    # the metadata tag disagrees with the config
    _edit_quant(run, format="int8", group_size=None)
    save_file(tensors, str(weights), metadata={"moelab_quant": "int4"})
    with pytest.raises(CheckpointError, match=r"moelab_quant='int4' but .*config\.json says \"quant\"\.format='int8'"):
        load_quantized(run, verify=False)
    # a float file under a quantised config
    rundir.save_model(_model(), tmp_path / "float")
    _edit_quant(run)
    (tmp_path / "float" / "model.safetensors").replace(weights)
    with pytest.raises(CheckpointError, match="is missing"):
        load_quantized(run, verify=False)


def test_a_truncated_file(int8_run):
    weights = int8_run[1] / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{weights} does not match the sha256"):
        load_any(int8_run[1])
    with pytest.raises(CheckpointError, match=rf"{weights}.*(corrupt or truncated)"):
        load_any(int8_run[1], verify=False)


def test_save_refuses_a_model_not_in_that_format(tmp_path):
    with pytest.raises(ConfigError, match=r"fmt='int8' but layers\.0\.mlp\.experts are float experts"):
        save_quantized(_model(), tmp_path / "q", fmt="int8")
    with pytest.raises(ConfigError, match=r"fmt='int4' but .* are int8"):
        save_quantized(_quantized("int8"), tmp_path / "q", fmt=FORMATS["int4"])
    with pytest.raises(ConfigError, match="fmt='int5' is not a format"):
        save_quantized(_quantized("int8"), tmp_path / "q", fmt="int5")
    assert not (tmp_path / "q").exists()
    # int8 has no groups: a QuantFormat's group_size does not matter there
    save_quantized(_quantized(QuantFormat(name="int8", group_size=32)), tmp_path / "q", fmt="int8")
    assert load_quantized(tmp_path / "q").kind == "moelab-int8"


def test_out_exists_overwrite_and_no_half_written_folder(tmp_path, int8_run, monkeypatch):
    _, run = int8_run
    other = _quantized("int8", seed=1)
    with pytest.raises(CheckpointError, match=rf"{run}: exists and is not empty .*--overwrite"):
        save_quantized(other, run, fmt="int8")
    save_quantized(other, run, fmt="int8", overwrite=True)
    ids = torch.randint(0, V, (1, 5))
    assert torch.equal(_logits(load_quantized(run).model, ids), _logits(other, ids))

    stranger = tmp_path / "notes"
    stranger.mkdir()
    (stranger / "todo.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not a moelab run directory; refusing to replace it"):
        save_quantized(other, stranger, fmt="int8", overwrite=True)

    def fail(model, path, *, metadata=None):
        path.write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(rundir.weights, "save_weights", fail)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(OSError, match="disk full"):
        save_quantized(other, tmp_path / "new", fmt="int8")
    with pytest.raises(OSError, match="disk full"):
        save_quantized(_quantized("int8"), run, fmt="int8", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no OUT, no temp folder left
    assert torch.equal(_logits(load_quantized(run).model, ids), _logits(other, ids))  # the old OUT intact
