"""`moelab size` per moelab format and `--memory`: the calculator's bytes against what the
quantiser writes and holds, and its smallest expert budget against the offload store's."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from moelab.accounting.formats import (
    MOELAB_FORMATS,
    format_bytes,
    memory_plan,
    routed_expert_bytes,
    smallest_expert_budget,
)
from moelab.accounting.moelab_config import spec_from_moelab_config
from moelab.accounting.params import count_params
from moelab.cli.main import main
from moelab.errors import ConfigError
from moelab.model import ModelConfig, Transformer
from moelab.moe import MoEConfig
from moelab.offload import ExpertStore, expert_layouts, load_offloaded
from moelab.quant import QuantFormat, QuantizedExperts, quantize_model, save_quantized
from moelab.rundir import save_model


def _cfg() -> ModelConfig:
    # d_expert 64 and d_model 32: int4 groups of 32 divide both inputs; one dense layer first.
    moe = MoEConfig(d_model=32, d_expert=64, num_experts=4, top_k=2)
    return ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=2, n_kv_heads=1, d_ff=48, max_seq_len=64,
                       moe=moe, first_dense_layers=1)


def _model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(_cfg()).eval()


def _spec_counts():
    spec = spec_from_moelab_config(_cfg())
    return spec, count_params(spec)


def _file_bytes(path, experts_only: bool) -> int:
    n = 0
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            if experts_only and ".mlp.experts." not in key:
                continue
            t = f.get_tensor(key)
            n += t.numel() * t.element_size()
    return n


@pytest.mark.parametrize("fmt", ["int8", "int4", "bf16"])
def test_the_calculators_bytes_are_the_quantised_files_and_the_resident_copy(tmp_path, fmt):
    spec, counts = _spec_counts()
    model = _model()
    qfmt = QuantFormat(name="int4", group_size=32) if fmt == "int4" else fmt
    quantize_model(model, qfmt)
    run = save_quantized(model, tmp_path / fmt, fmt=qfmt)
    predicted = routed_expert_bytes(spec, counts, fmt, rest="fp32", group_size=32)
    assert _file_bytes(run / "model.safetensors", experts_only=True) == predicted
    # The rest stays as it was (fp32 here): the whole file is the format's total.
    assert _file_bytes(run / "model.safetensors", experts_only=False) == format_bytes(
        spec, counts, fmt, rest="fp32", group_size=32)
    if fmt != "bf16":
        # One resident copy, the size of the saved one (int4: the kernel's packed form).
        quantized = [m for m in model.modules() if isinstance(m, QuantizedExperts)]
        with torch.inference_mode():
            model(torch.zeros(1, 4, dtype=torch.long), telemetry=False)  # int4: builds the kernel's copy
        assert sum(m.resident_nbytes() for m in quantized) == predicted


def test_a_float_format_with_the_rest_at_the_same_dtype_is_every_parameter_at_it():
    spec, counts = _spec_counts()
    n = sum(p.numel() for p in _model().parameters())
    assert counts.total == n
    assert format_bytes(spec, counts, "fp32", rest="fp32") == 4 * n
    assert format_bytes(spec, counts, "bf16", rest="bf16") == 2 * n


def test_smallest_budget_is_the_offload_stores_own_minimum(tmp_path):
    spec, counts = _spec_counts()
    model = _model()
    run = save_model(model, tmp_path / "run")
    smallest = smallest_expert_budget(spec, "fp32")
    assert smallest is not None
    store = ExpertStore(run / "model.safetensors", expert_layouts(model), expert_memory=int(smallest))
    store.close()
    with pytest.raises(ConfigError, match="smallest allowed"):
        ExpertStore(run / "model.safetensors", expert_layouts(model), expert_memory=int(smallest) - 1)



@pytest.mark.parametrize("fmt, group", [("int8", 128), ("int4", 32)])
def test_smallest_quantised_budget_is_the_offload_stores_own_minimum(tmp_path, fmt, group):
    spec, counts = _spec_counts()
    model = _model()
    qfmt = QuantFormat(name=fmt, group_size=group)
    quantize_model(model, qfmt)
    run = save_quantized(model, tmp_path / "q", fmt=qfmt)
    smallest = smallest_expert_budget(spec, fmt, group)
    assert smallest is not None
    with pytest.raises(ConfigError, match=rf"smallest allowed value is {int(smallest)} bytes"):
        load_offloaded(run, expert_memory=int(smallest) - 1)
    load_offloaded(run, expert_memory=int(smallest)).store.close()


def test_memory_plan_resident_offloaded_and_not_at_all():
    spec, counts = _spec_counts()
    by = lambda plan: {f.format: f for f in plan}  # noqa: E731
    big = by(memory_plan(spec, counts, 1e12, kv_bytes=0.0, group_size=32))
    assert all(f.fits and f.runs and f.expert_budget is None for f in big.values())
    bf16 = format_bytes(spec, counts, "bf16")
    experts = routed_expert_bytes(spec, counts, "bf16")
    # Room for the non-expert weights and half the experts, at 90% usable.
    mem = (bf16 - experts / 2) / 0.9
    plan = by(memory_plan(spec, counts, mem, kv_bytes=0.0, group_size=32))
    assert not plan["bf16"].fits and plan["bf16"].runs
    assert plan["bf16"].resident_fraction == pytest.approx(0.5)
    assert plan["int4"].fits  # the int4 file is under half of bf16's here
    f32 = plan["fp32"]  # experts fp32, the rest bf16: the budget is what the rest leaves
    assert f32.expert_budget == pytest.approx(0.9 * mem - (f32.weight_bytes - f32.expert_bytes))
    assert f32.runs == (f32.expert_budget >= f32.smallest_budget)
    tiny = by(memory_plan(spec, counts, 1000.0, kv_bytes=0.0, group_size=32))
    assert not any(f.runs for f in tiny.values())
    # smallest_memory is where it starts to run.
    f = plan["fp32"]
    at = by(memory_plan(spec, counts, f.smallest_memory * (1 + 1e-9), kv_bytes=0.0, group_size=32))["fp32"]
    assert at.runs and not by(memory_plan(spec, counts, f.smallest_memory * (1 - 1e-6), kv_bytes=0.0, group_size=32))["fp32"].runs


def test_the_torch_free_copies_are_the_quantisers_own():
    from moelab.accounting import formats as acc
    from moelab.quant import formats as qf

    assert acc.INT4_GROUP_SIZES == qf.INT4_GROUP_SIZES
    assert acc.SCALE_BYTES == qf.SCALE_DTYPE.itemsize


def test_bad_format_and_group_size_are_named():
    spec, counts = _spec_counts()
    with pytest.raises(ConfigError, match="not a moelab format"):
        routed_expert_bytes(spec, counts, "int3")
    with pytest.raises(ConfigError, match="group size"):
        routed_expert_bytes(spec, counts, "int4", group_size=48)
    with pytest.raises(ConfigError, match="does not divide"):
        routed_expert_bytes(spec, counts, "int4", group_size=128)  # d_model 32


def test_size_cli_prints_the_formats_and_the_memory_plan(capsys):
    assert main(["size", "mixtral-8x7b", "--memory", "64GB"]) == 0
    out = capsys.readouterr().out
    assert "moelab checkpoint formats" in out and "on 64 GB" in out
    assert "fits resident" in out and "--expert-memory" in out
    assert main(["size", "mixtral-8x7b", "--memory", "64GB", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert set(r["moelab_format_bytes"]["bytes"]) == set(MOELAB_FORMATS)
    plan = {f["format"]: f for f in r["memory_plan"]["formats"]}
    assert plan["int4"]["fits"] and not plan["bf16"]["fits"] and plan["bf16"]["runs"]
    assert r["memory_plan"]["memory_gb"] == 64


def test_size_cli_rejects_a_bad_memory(capsys):
    assert main(["size", "mixtral-8x7b", "--memory", "lots"]) != 0
    assert "--memory" in capsys.readouterr().err
