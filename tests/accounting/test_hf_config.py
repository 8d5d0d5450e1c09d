"""`count_params(spec_from_hf_config(cfg)).total` equals transformers' own count.

Every family is built on the meta device (no memory, no weights) from small,
deliberately non-default configs, and the two counts must agree to the parameter.
The config goes through `to_dict()` -> JSON file -> `load_hf_config`, the path a
user's config.json takes.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moelab.accounting.hf_config import FAMILIES, load_hf_config, spec_from_hf_config  # noqa: E402
from moelab.accounting.params import count_params  # noqa: E402
from moelab.errors import ConfigError, DataError  # noqa: E402

T = transformers
BASE = dict(vocab_size=1003, hidden_size=64, num_hidden_layers=4, num_attention_heads=4)


def _cases() -> list[tuple[str, object]]:
    gqa = dict(BASE, num_key_value_heads=2)
    mla = dict(
        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12,
        moe_intermediate_size=32, intermediate_size=96, num_experts_per_tok=2,
    )
    return [
        ("llama", T.LlamaConfig(**gqa, intermediate_size=96)),
        ("llama-bias-tied-hd", T.LlamaConfig(
            **gqa, intermediate_size=80, attention_bias=True, mlp_bias=True,
            tie_word_embeddings=True, head_dim=24)),
        ("mistral", T.MistralConfig(**gqa, intermediate_size=96, head_dim=8, sliding_window=32)),
        ("qwen2", T.Qwen2Config(**gqa, intermediate_size=96, tie_word_embeddings=True)),
        ("qwen3", T.Qwen3Config(**gqa, intermediate_size=96, head_dim=20, attention_bias=True)),
        ("mixtral", T.MixtralConfig(
            **gqa, intermediate_size=96, num_local_experts=5, num_experts_per_tok=2)),
        ("mixtral-tied-hd", T.MixtralConfig(
            **gqa, intermediate_size=48, num_local_experts=3, num_experts_per_tok=1,
            head_dim=12, tie_word_embeddings=True)),
        ("phimoe", T.PhimoeConfig(
            **gqa, intermediate_size=96, num_local_experts=4, num_experts_per_tok=2,
            attention_bias=True, lm_head_bias=True)),
        ("granitemoe", T.GraniteMoeConfig(
            **gqa, intermediate_size=40, num_local_experts=6, num_experts_per_tok=2,
            attention_bias=True, tie_word_embeddings=True)),
        ("olmoe", T.OlmoeConfig(
            **gqa, intermediate_size=40, num_experts=6, num_experts_per_tok=2)),
        ("qwen2_moe", T.Qwen2MoeConfig(
            **gqa, intermediate_size=96, moe_intermediate_size=24, num_experts=6,
            num_experts_per_tok=2, shared_expert_intermediate_size=56,
            decoder_sparse_step=2, mlp_only_layers=[3])),
        ("qwen3_moe", T.Qwen3MoeConfig(
            **gqa, intermediate_size=96, moe_intermediate_size=24, num_experts=8,
            num_experts_per_tok=3, head_dim=24, mlp_only_layers=[0], tie_word_embeddings=True)),
        ("deepseek_v2", T.DeepseekV2Config(
            **BASE, **mla, q_lora_rank=None, n_routed_experts=6, n_shared_experts=2,
            first_k_dense_replace=1, mlp_bias=True, attention_bias=True, n_group=2, topk_group=1)),
        ("deepseek_v3", T.DeepseekV3Config(
            **BASE, **mla, q_lora_rank=24, n_routed_experts=8, n_shared_experts=1,
            first_k_dense_replace=2, n_group=2, topk_group=1)),
        ("dbrx", T.DbrxConfig(
            vocab_size=1003, d_model=64, n_heads=4, n_layers=3,
            attn_config={"kv_n_heads": 2},
            ffn_config={"ffn_hidden_size": 40, "moe_num_experts": 5, "moe_top_k": 2})),
        ("granitemoeshared", T.GraniteMoeSharedConfig(
            **gqa, intermediate_size=40, num_local_experts=6, num_experts_per_tok=2, shared_intermediate_size=24,
            attention_bias=True)),
        ("glm4_moe", T.Glm4MoeConfig(
            **gqa, intermediate_size=96, moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=2,
            n_shared_experts=2, first_k_dense_replace=1, attention_bias=True, use_qk_norm=True, head_dim=20)),
        ("dots1", T.Dots1Config(
            **gqa, intermediate_size=96, moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=2,
            n_shared_experts=1, first_k_dense_replace=2, attention_bias=True)),
        ("gpt_oss", T.GptOssConfig(
            **gqa, intermediate_size=40, num_local_experts=4, num_experts_per_tok=2,
            head_dim=20, sliding_window=8)),
        ("llama4_text", T.Llama4TextConfig(
            **gqa, head_dim=16, intermediate_size=40, intermediate_size_mlp=72,
            num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2)),
        ("llama4_text-all-moe", T.Llama4TextConfig(
            **gqa, head_dim=16, intermediate_size=40, intermediate_size_mlp=72,
            num_local_experts=3, num_experts_per_tok=2, tie_word_embeddings=True)),
    ]


CASES = _cases()


def _meta_count(cfg) -> int:
    if cfg.model_type == "dbrx" and not hasattr(cfg.attn_config, "rope_theta"):
        # transformers 5.24's DbrxAttention reads attn_config.rope_theta, which the
        # config class no longer defines; it does not affect any parameter shape.
        cfg.attn_config.rope_theta = 10000.0
    with torch.device("meta"):
        model = T.AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,cfg", CASES, ids=[c[0] for c in CASES])
def test_total_equals_transformers_meta_count(name, cfg, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_dict()))
    raw, source = load_hf_config(tmp_path)  # a folder holding config.json
    counts = count_params(spec_from_hf_config(raw, source=source))
    assert counts.total == _meta_count(cfg)


def test_every_family_has_a_parity_case():
    tested = {cfg.model_type for _, cfg in CASES}
    assert set(FAMILIES) - tested == {"llama4"}  # covered by the text_config test below


def test_llama4_multimodal_config_uses_text_config():
    text = T.Llama4TextConfig(**dict(BASE, num_key_value_heads=2), head_dim=16,
                              intermediate_size=40, intermediate_size_mlp=72, num_local_experts=4)
    outer = {"model_type": "llama4", "text_config": text.to_dict(), "vision_config": {}}
    spec = spec_from_hf_config(outer)
    assert count_params(spec).total == _meta_count(text)
    assert any("vision" in note for note in spec.notes)


def test_active_params_skip_unrouted_experts():
    cfg = T.MixtralConfig(**dict(BASE, num_key_value_heads=2), intermediate_size=96,
                          num_local_experts=5, num_experts_per_tok=2)
    c = count_params(spec_from_hf_config(cfg.to_dict()))
    per_expert = 3 * 64 * 96
    assert c.total - c.active == 4 * 3 * per_expert  # 4 layers x 3 skipped experts


def test_unsupported_model_type_names_file_and_families():
    with pytest.raises(ConfigError, match=r"my\.json: model_type 'gpt2' is not supported.*mixtral"):
        spec_from_hf_config({"model_type": "gpt2"}, source="my.json")


@pytest.mark.parametrize("use_transformers", [True, False], ids=["transformers", "table"])
def test_missing_field_without_default_names_file_field_and_families(use_transformers):
    # DeepseekV2Config has no default for num_experts_per_tok: nothing to fill in.
    cfg = {"model_type": "deepseek_v2", **BASE, "kv_lora_rank": 16, "n_routed_experts": 4}
    with pytest.raises(ConfigError, match=r"c\.json: field 'num_experts_per_tok' is missing.*supported"):
        spec_from_hf_config(cfg, source="c.json", use_transformers=use_transformers)


# config.json files with keys left out: transformers fills them from the class defaults
# (8 KV heads for Mixtral, head_dim 64 for gpt-oss, DeepSeek's shared experts, ...).
SMALL = dict(vocab_size=1003, hidden_size=64, num_hidden_layers=4, num_attention_heads=16)
MISSING_KEYS = {
    "mixtral": dict(SMALL, intermediate_size=32),  # num_key_value_heads, experts, top-k
    "phimoe": dict(SMALL, intermediate_size=32),
    "gpt_oss": dict(SMALL, intermediate_size=32, num_local_experts=4),  # head_dim, KV heads, layer_types
    "llama4_text": dict(SMALL, intermediate_size=32, intermediate_size_mlp=48, num_local_experts=4),
    "qwen2_moe": dict(SMALL, intermediate_size=32, moe_intermediate_size=8, shared_expert_intermediate_size=16),
    "qwen3_moe": dict(SMALL, intermediate_size=32, moe_intermediate_size=8),  # expert count, KV heads
    "olmoe": dict(SMALL, intermediate_size=32),
    "granitemoe": dict(SMALL, intermediate_size=32),
    "deepseek_v3": dict(SMALL, intermediate_size=32, moe_intermediate_size=8, kv_lora_rank=16,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=8,
                        n_group=2, topk_group=1),  # q_lora_rank, n_shared_experts, first_k_dense_replace
    "deepseek_v2": dict(SMALL, intermediate_size=32, moe_intermediate_size=8, kv_lora_rank=16,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=8,
                        num_experts_per_tok=2),
    "dbrx": dict(vocab_size=1003, d_model=64, n_heads=4, n_layers=2),  # attn_config, ffn_config
    "glm4_moe": dict(SMALL, intermediate_size=32, moe_intermediate_size=8, n_routed_experts=8),  # KV heads, shared
    "dots1": dict(SMALL, num_attention_heads=32, intermediate_size=32, moe_intermediate_size=8, n_routed_experts=8,
                  num_experts_per_tok=2, n_shared_experts=1),  # 32 KV heads by default
    "granitemoeshared": dict(SMALL, intermediate_size=32, shared_intermediate_size=16),
}


@pytest.mark.parametrize("use_transformers", [True, False], ids=["transformers", "table"])
@pytest.mark.parametrize("model_type", sorted(MISSING_KEYS))
def test_missing_keys_get_transformers_defaults(model_type, use_transformers):
    raw = {"model_type": model_type, **MISSING_KEYS[model_type]}
    lib = T.AutoConfig.for_model(model_type, **MISSING_KEYS[model_type])
    spec = spec_from_hf_config(raw, use_transformers=use_transformers)
    assert count_params(spec).total == _meta_count(lib)
    assert any(("transformers" in n) for n in spec.notes)  # the output says how it was read


def test_class_defaults_table_matches_installed_transformers():
    import dataclasses

    from moelab.accounting.hf_defaults import CLASS_DEFAULTS

    for model_type, table in CLASS_DEFAULTS.items():
        defaults = {f.name: f.default for f in dataclasses.fields(T.CONFIG_MAPPING[model_type])}
        assert {k: defaults[k] for k in table} == table, model_type


def test_qwen2_moe_sliding_layers_follow_transformers_rule():
    cfg = dict(SMALL, num_hidden_layers=6, intermediate_size=32, moe_intermediate_size=8,
               shared_expert_intermediate_size=16, use_sliding_window=True, sliding_window=16,
               max_window_layers=4)
    lib = T.Qwen2MoeConfig(**cfg)
    want = [16 if t == "sliding_attention" else None for t in lib.layer_types]
    for use in (True, False):
        spec = spec_from_hf_config({"model_type": "qwen2_moe", **cfg}, use_transformers=use)
        assert [layer.attention.window for layer in spec.layers] == want


def test_kimi_k2_is_deepseek_v3():
    cfg = MISSING_KEYS["deepseek_v3"]
    a = count_params(spec_from_hf_config({"model_type": "kimi_k2", **cfg})).total
    assert a == count_params(spec_from_hf_config({"model_type": "deepseek_v3", **cfg})).total


MALFORMED = [
    ("qwen2_moe", {"decoder_sparse_step": 0}, r"field 'decoder_sparse_step' must be an int >= 1, got 0"),
    ("qwen3_moe", {"mlp_only_layers": "0,1"}, r"field 'mlp_only_layers' must be a list of layer indices"),
    ("qwen3_moe", {"mlp_only_layers": [0, 9]}, r"field 'mlp_only_layers' has an index outside"),
    ("gpt_oss", {"layer_types": ["full_attention"]}, r"field 'layer_types' has 1 entries, expected one per layer"),
    ("gpt_oss", {"layer_types": "sliding_attention"}, r"field 'layer_types' must be a list of strings"),
    ("qwen2_moe", {"layer_types": ["full"] * 4}, r"field 'layer_types' has unknown value"),
    ("mixtral", {"num_experts_per_tok": 9, "num_local_experts": 4},
     r"field 'num_experts_per_tok' \(9\) exceeds 'num_local_experts' \(4\)"),
    ("deepseek_v3", {"q_lora_rank": 0}, r"field 'q_lora_rank' must be an int >= 1, got 0"),
    ("mixtral", {"num_key_value_heads": 3}, r"field 'num_attention_heads' \(16\) must be a multiple of"),
]


@pytest.mark.parametrize("use_transformers", [True, False], ids=["transformers", "table"])
@pytest.mark.parametrize("model_type,bad,message", MALFORMED, ids=[f"{m}-{next(iter(b))}" for m, b, _ in MALFORMED])
def test_malformed_config_one_line_error_naming_the_field(model_type, bad, message, use_transformers):
    raw = {"model_type": model_type, **MISSING_KEYS[model_type], **bad}
    with pytest.raises(ConfigError, match=r"^c\.json: " + message) as e:
        spec_from_hf_config(raw, source="c.json", use_transformers=use_transformers)
    assert "\n" not in str(e.value) and "Spec" not in str(e.value)


def test_malformed_and_missing_files(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_hf_config(bad)
    with pytest.raises(DataError, match="no such config file"):
        load_hf_config(tmp_path / "nope")
    bad.write_text("[1, 2]")
    with pytest.raises(DataError, match="JSON object"):
        load_hf_config(bad)
