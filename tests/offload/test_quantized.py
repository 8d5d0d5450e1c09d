"""Offloaded quantised experts (int8 / int4 runs of `moelab quantize`): the same logits and
tokens as the resident quantised model, the budget in quantised bytes, clear errors."""

from __future__ import annotations

import json
import re

import pytest
import torch

from moelab.errors import CheckpointError, ConfigError
from moelab.infer.generate import generate
from moelab.model import ModelConfig
from moelab.moe import MoE, MoEConfig
from moelab.offload import OffloadedExperts, load_offloaded
from moelab.quant import QuantFormat, load_quantized, quantize_model, save_quantized
from moelab.quant import experts as qexperts
from moelab.rundir import save_model

from .conftest import random_model

D, F, E, G = 64, 64, 4, 32
# One swiglu expert's stored bytes: int8 [2F, D] + [D, F] int8 and a bf16 scale per row;
# int4 nibbles and a bf16 (scale, zero) per group of G per row. Each part is 64-aligned.
INT8_EXPERT = 2 * F * D + 2 * F * 2 + D * F + D * 2
INT4_EXPERT = 2 * F * D // 2 + 2 * F * (D // G) * 4 + D * F // 2 + D * (F // G) * 4
FORMATS = {"int8": QuantFormat(name="int8"), "int4": QuantFormat(name="int4", group_size=G)}
PROMPTS = [[5, 9, 1, 1, 2, 7], [11, 4], [12, 3, 3, 8, 5, 13, 0, 2, 15]]


def _cfg(**moe) -> ModelConfig:
    return ModelConfig(vocab_size=96, d_model=D, n_layers=3, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=64,
                       moe=MoEConfig(d_model=D, d_expert=F, num_experts=E, top_k=2, **moe), first_dense_layers=1)


def _quantized_run(tmp_path, fmt: str, what: str = "experts", head: str | None = None, **moe):
    model = random_model(_cfg(**moe))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MoE):
                m.reset_parameters(std=0.3)  # clear routing margins: rounding flips no expert choice
    quantize_model(model, FORMATS[fmt], what=what, head=head)
    return save_quantized(model, tmp_path / f"{fmt}-{what}-{head}", fmt=FORMATS[fmt])


@pytest.mark.parametrize("fmt, what, head", [("int8", "experts", None), ("int4", "experts", None),
                                             ("int8", "all", None), ("int4", "all", "int8")])
def test_offloaded_quantised_experts_compute_exactly_what_the_resident_ones_do(tmp_path, fmt, what, head):
    run = _quantized_run(tmp_path, fmt, what, head)
    resident = load_quantized(run).model
    expert = INT8_EXPERT if fmt == "int8" else INT4_EXPERT
    off = load_offloaded(run, expert_memory=2 * expert)  # one slot per MoE layer: a miss per new expert
    assert off.kind == f"moelab-offload-{fmt}"
    assert all(isinstance(m.experts, OffloadedExperts) for m in off.model.modules() if isinstance(m, MoE))
    ids = torch.randint(0, 96, (3, 9), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        # The same kernels on the same bytes, expert by expert: equal to the last bit.
        assert torch.equal(off.model(ids, telemetry=False).logits, resident(ids, telemetry=False).logits)
    for prompts in (PROMPTS, PROMPTS[:1]):
        want = generate(resident, prompts, max_new_tokens=10).token_ids
        assert generate(off.model, prompts, max_new_tokens=10).token_ids == want
    s = off.stats()
    assert s.expert_bytes == expert and s.peak_resident_bytes <= 2 * expert and s.misses > 2
    assert s.bytes_read == s.misses * expert  # a miss reads the expert's stored parts (unaligned: same sum here)
    # The resident rest is what the resident model holds besides its experts (int4 linears:
    # their kernel copies, which are not buffers).
    experts = {id(t) for m in resident.modules() if isinstance(m, MoE)
               for t in [*m.experts.parameters(), *m.experts.buffers()]}
    rest = sum(t.numel() * t.element_size() for t in [*resident.parameters(), *resident.buffers()]
               if id(t) not in experts)
    rest += sum(m.kernel_only_nbytes() for m in resident.modules() if hasattr(m, "kernel_only_nbytes"))
    assert off.non_expert_bytes() == rest > 0


def test_a_budget_holds_about_4x_as_many_int8_experts_as_float32_ones(tmp_path):
    run = _quantized_run(tmp_path, "int8")
    float32_expert = (2 * F * D + D * F) * 4
    assert 3 * INT8_EXPERT < float32_expert < 4 * INT8_EXPERT  # the bf16 scales: 3.9x, not 4x
    off = load_offloaded(run, expert_memory=2 * float32_expert)  # one float32 expert per MoE layer
    assert off.stats().slots == 2 * 3
    off = load_offloaded(run, expert_memory=2 * E * INT8_EXPERT)  # every expert fits
    generate(off.model, PROMPTS, max_new_tokens=6)
    s = off.stats()
    assert s.slots == 2 * E and s.evictions == 0 and s.misses <= 2 * E
    assert s.peak_resident_bytes <= 2 * E * INT8_EXPERT


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_the_loop_reference_dequantises_and_stays_close(tmp_path, fmt):
    run = _quantized_run(tmp_path, fmt, impl="loop")
    resident = load_quantized(run).model
    off = load_offloaded(run, expert_memory=2 * (INT8_EXPERT if fmt == "int8" else INT4_EXPERT))
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        a, b = off.model(ids, telemetry=False).logits, resident(ids, telemetry=False).logits
    # float32 on the dequantised weights against the kernels' bf16 activations
    torch.testing.assert_close(a, b, rtol=0, atol=2e-2 * float(b.abs().max()))
    moe = next(m for m in off.model.modules() if isinstance(m, MoE))
    parts = moe.experts.weights(1)
    ref = next(m for m in resident.modules() if isinstance(m, MoE)).experts
    for proj in ("in", "out"):  # the slot's weights, read back, are the checkpoint's exactly
        assert torch.equal(moe.experts.dequantized_weight(parts, proj), ref.dequantized_weight(proj, 1))


def test_without_the_int4_kernel_slots_hold_the_portable_form_and_dequantise(tmp_path, monkeypatch):
    run = _quantized_run(tmp_path, "int4")
    monkeypatch.setitem(qexperts._PROBED, "int4", False)
    resident = load_quantized(run).model  # its dequantise fallback
    off = load_offloaded(run, expert_memory=2 * INT4_EXPERT + 2 * 64)  # the portable form: 3 parts per projection
    assert not off.store.layouts[0].kernel_form
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        torch.testing.assert_close(off.model(ids, telemetry=False).logits, resident(ids, telemetry=False).logits,
                                   rtol=1e-5, atol=1e-5)


def test_a_bf16_run_and_a_cuda_store_are_refused(tmp_path):
    model = random_model(_cfg())
    quantize_model(model, "bf16")
    run = save_quantized(model, tmp_path / "bf16", fmt="bf16")
    with pytest.raises(CheckpointError, match=re.escape(str(run / "config.json")) + ".*a bf16 run.*float, int8 and "
                                                                                    "int4 runs"):
        load_offloaded(run, expert_memory=10**9)
    q = _quantized_run(tmp_path, "int8")
    with pytest.raises(ConfigError, match="device='cuda' with the int8 run .*CPU kernels only"):
        load_offloaded(q, expert_memory=10**9, device="cuda")


def test_a_float_file_under_an_int8_config_names_the_missing_tensor(tmp_path):
    model = random_model(_cfg())
    run = save_model(model, tmp_path / "lying", quant={"format": "int8", "group_size": None, "what": "experts",
                                                       "moelab_quant_version": 2})
    with pytest.raises(CheckpointError, match=r"tensor 'layers\.1\.mlp\.experts\.gate_up_proj_qweight' is missing"):
        load_offloaded(run, expert_memory=10**9)


def test_an_expert_tensor_stored_in_another_dtype_is_named(tmp_path):
    run = _quantized_run(tmp_path, "int8")
    from safetensors.torch import load_file, save_file

    path = run / "model.safetensors"
    tensors = load_file(path)
    name = "layers.2.mlp.experts.down_proj_scale"
    tensors[name] = tensors[name].float()
    save_file(tensors, path, metadata={"moelab_quant": "int8"})
    cfg = json.loads((run / "config.json").read_text())
    cfg.pop("weights_sha256", None)
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=rf"tensor '{re.escape(name)}' is stored as F32, expected BF16"):
        load_offloaded(run, expert_memory=10**9)


def test_an_offloaded_int4_model_serves_the_resident_quantised_tokens(tmp_path):
    from moelab.serve.engine import Engine, EngineConfig, run_to_completion
    from moelab.serve.types import GenerationRequest

    run = _quantized_run(tmp_path, "int4", "all", "int8")
    resident = load_quantized(run).model
    off = load_offloaded(run, expert_memory=2 * INT4_EXPERT)
    engine = Engine(off.model, EngineConfig(max_num_seqs=3, max_len=64))  # continuous batching: mixed rows
    reqs = [GenerationRequest(prompt_ids=tuple(p), max_tokens=8) for p in PROMPTS]
    events = run_to_completion(engine, reqs)
    for r, p in zip(reqs, PROMPTS, strict=True):
        assert [t for e in events[r.request_id] for t in e.token_ids] == generate(resident, [p],
                                                                                  max_new_tokens=8).token_ids[0]
    assert off.stats().peak_resident_bytes <= 2 * INT4_EXPERT


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_next_layer_prefetch_loads_quantised_experts_on_its_thread_and_changes_nothing(tmp_path, fmt):
    run = _quantized_run(tmp_path, fmt)
    resident = load_quantized(run).model
    expert = INT8_EXPERT if fmt == "int8" else INT4_EXPERT
    off = load_offloaded(run, expert_memory=2 * 2 * expert, prefetch=True)  # two slots per MoE layer
    for prompts in (PROMPTS, PROMPTS[:1]):
        want = generate(resident, prompts, max_new_tokens=10).token_ids
        assert generate(off.model, prompts, max_new_tokens=10).token_ids == want
    off.store.wait_prefetch()
    s = off.stats()
    assert s.prefetched > 0 and s.peak_resident_bytes <= 4 * expert
    off.store.close()
