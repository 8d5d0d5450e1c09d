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


def test_missing_field_names_file_field_and_families():
    cfg = T.MixtralConfig(**dict(BASE, num_key_value_heads=2)).to_dict()
    del cfg["num_local_experts"]
    with pytest.raises(ConfigError, match=r"c\.json: field 'num_local_experts' is missing.*supported"):
        spec_from_hf_config(cfg, source="c.json")


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
