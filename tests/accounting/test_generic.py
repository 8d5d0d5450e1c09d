"""The generic sizing path (meta-device model, parameters classified by module names)
agrees with the exact readers wherever both apply, and answers for families without one."""

from __future__ import annotations

import json

import pytest

transformers = pytest.importorskip("transformers")

from moelab.accounting.generic import classify, spec_from_meta_model  # noqa: E402
from moelab.accounting.hf_config import spec_from_hf_config  # noqa: E402
from moelab.accounting.params import count_params  # noqa: E402
from moelab.errors import ConfigError  # noqa: E402

T = transformers
GQA = dict(vocab_size=1003, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
MLA = dict(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12, moe_intermediate_size=32,
           intermediate_size=96, num_experts_per_tok=2)
BOTH = [
    T.MixtralConfig(**GQA, intermediate_size=96, num_local_experts=5, num_experts_per_tok=2),
    T.Qwen2MoeConfig(**GQA, intermediate_size=96, moe_intermediate_size=24, num_experts=6, num_experts_per_tok=2,
                     shared_expert_intermediate_size=56),
    T.Qwen3MoeConfig(**GQA, intermediate_size=96, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=3,
                     tie_word_embeddings=True),
    T.OlmoeConfig(**GQA, intermediate_size=40, num_experts=6, num_experts_per_tok=2),
    T.DeepseekV3Config(**{**GQA, "num_key_value_heads": 4}, **MLA, q_lora_rank=24, n_routed_experts=8,
                       n_shared_experts=1, first_k_dense_replace=2, n_group=2, topk_group=1),
    T.GptOssConfig(**GQA, intermediate_size=40, num_local_experts=4, num_experts_per_tok=2, head_dim=20),
    T.Glm4MoeConfig(**GQA, intermediate_size=96, moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=2,
                    n_shared_experts=2, first_k_dense_replace=1),
    T.Llama4TextConfig(**GQA, head_dim=16, intermediate_size=40, intermediate_size_mlp=72, num_local_experts=3,
                       num_experts_per_tok=2),
]


@pytest.mark.parametrize("cfg", BOTH, ids=[c.model_type for c in BOTH])
def test_generic_path_equals_the_exact_reader(cfg):
    raw = json.loads(json.dumps(cfg.to_dict()))
    exact = count_params(spec_from_hf_config(raw))
    generic_spec = spec_from_meta_model(raw)
    generic = count_params(generic_spec)
    assert generic.total == exact.total
    assert generic.active == exact.active
    assert generic.embedding == exact.embedding and generic.lm_head == exact.lm_head
    assert "generic path" in generic_spec.notes[0]


@pytest.mark.parametrize("model_type", ["ernie4_5_moe", "jamba", "qwen3_next", "minimax", "hunyuan_v1_moe"])
def test_generic_path_sizes_families_without_an_exact_reader(model_type):
    """Small configs of families moelab has no reader for: the total is transformers' own
    count, the routed share is a whole number of experts, and active < total."""
    import torch

    small = dict(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, moe_intermediate_size=32)
    lib = T.AutoConfig.for_model(model_type, **small)
    with torch.device("meta"):
        want = sum(p.numel() for p in T.AutoModelForCausalLM.from_config(lib).parameters())
    counts = count_params(spec_from_meta_model({"model_type": model_type, **small}))
    assert counts.total == want
    assert counts.active < counts.total or counts.routed_experts == counts.routed_active


def test_generic_path_refuses_a_dense_family():
    with pytest.raises(ConfigError, match="model_type 'gpt2' is not supported: its config has no expert count"):
        spec_from_meta_model({"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2})
    with pytest.raises(ConfigError, match="model_type 'nope' is not supported: neither an exact reader"):
        spec_from_meta_model({"model_type": "nope"})


@pytest.mark.parametrize("name,kind", [
    ("model.layers.0.mlp.experts.gate_up_proj", "routed_experts"),
    ("model.layers.0.block_sparse_moe.experts.3.w1.weight", "routed_experts"),
    ("model.layers.0.mlp.shared_experts.up_proj.weight", "shared_experts"),
    ("model.layers.0.mlp.shared_expert.up_proj.weight", "shared_experts"),
    ("model.layers.0.mlp.gate.weight", "router"),
    ("model.layers.0.mlp.router.bias", "router"),
    ("model.layers.0.mlp.gate_proj.weight", "other"),
    ("model.layers.0.self_attn.q_norm.weight", "norms"),
    ("model.layers.0.self_attn.q_proj.weight", "attention"),
])
def test_classify_by_module_names(name, kind):
    assert classify(name, 1 if name.endswith(("norm.weight", "bias")) else 2) == kind
