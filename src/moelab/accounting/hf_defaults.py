"""The class defaults of transformers' config classes, for sizing without transformers.

`moelab size` reads a config.json through transformers' own config class when
transformers is importable (see `hf_config.library_config`): missing keys then get the
library's defaults and its derived fields (`head_dim`, `num_key_value_heads`,
`layer_types`, ...). Importing transformers imports torch (~3 s), so sizing must also
work without it: then the missing keys of the families moelab sizes exactly are filled
from this table, the readers in `hf_config` apply the same derivation rules as the
classes' `__post_init__`, and the output says which path read the config.

The table is a copy of the dataclass field defaults of transformers 5.24 for the keys the
readers use (None defaults, which mean "derive", are left out). tests/accounting checks
it against the installed transformers, so a drift fails a test instead of a size.
"""

from __future__ import annotations

from typing import Any

CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "dbrx": {
        "vocab_size": 32000, "tie_word_embeddings": False, "d_model": 2048, "n_heads": 16,
        "n_layers": 24,
    },
    "deepseek_v2": {
        "num_attention_heads": 32, "hidden_size": 4096, "vocab_size": 102400,
        "num_hidden_layers": 32, "intermediate_size": 11008, "attention_bias": False,
        "mlp_bias": False, "tie_word_embeddings": False, "moe_intermediate_size": 1407,
        "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "v_head_dim": 128, "n_routed_experts": 64, "n_shared_experts": 2,
        "first_k_dense_replace": 0,
    },
    "deepseek_v3": {
        "num_attention_heads": 128, "num_key_value_heads": 128, "hidden_size": 7168,
        "vocab_size": 129280, "num_hidden_layers": 61, "intermediate_size": 18432,
        "attention_bias": False, "tie_word_embeddings": False, "num_experts_per_tok": 8,
        "moe_intermediate_size": 2048, "q_lora_rank": 1536, "kv_lora_rank": 512,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 256,
        "n_shared_experts": 1, "first_k_dense_replace": 3,
    },
    "dots1": {
        "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_size": 4608, "vocab_size": 152064,
        "num_hidden_layers": 62, "intermediate_size": 10944, "attention_bias": False,
        "tie_word_embeddings": False, "moe_intermediate_size": 1408, "first_k_dense_replace": 0,
        "sliding_window": 4096, "max_window_layers": 62,
    },
    "glm4_moe": {
        "num_attention_heads": 96, "num_key_value_heads": 8, "hidden_size": 4096, "vocab_size": 151552,
        "num_hidden_layers": 46, "intermediate_size": 10944, "attention_bias": False,
        "tie_word_embeddings": False, "num_experts_per_tok": 8, "moe_intermediate_size": 1408,
        "n_routed_experts": 128, "n_shared_experts": 1, "first_k_dense_replace": 1, "use_qk_norm": False,
    },
    "gpt_oss": {
        "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64, "hidden_size": 2880,
        "vocab_size": 201088, "num_hidden_layers": 36, "intermediate_size": 2880,
        "attention_bias": True, "sliding_window": 128, "tie_word_embeddings": False,
        "num_local_experts": 128, "num_experts_per_tok": 4,
    },
    "granitemoe": {
        "num_attention_heads": 32, "hidden_size": 4096, "vocab_size": 32000,
        "num_hidden_layers": 32, "intermediate_size": 11008, "attention_bias": False,
        "tie_word_embeddings": False, "num_local_experts": 8, "num_experts_per_tok": 2,
    },
    "granitemoeshared": {
        "num_attention_heads": 32, "hidden_size": 4096, "vocab_size": 32000, "num_hidden_layers": 32,
        "intermediate_size": 11008, "attention_bias": False, "tie_word_embeddings": False,
        "num_local_experts": 8, "num_experts_per_tok": 2, "shared_intermediate_size": 0,
    },
    "llama": {
        "num_attention_heads": 32, "hidden_size": 4096, "vocab_size": 32000,
        "num_hidden_layers": 32, "intermediate_size": 11008, "attention_bias": False,
        "mlp_bias": False, "tie_word_embeddings": False,
    },
    "llama4": {
        "tie_word_embeddings": False,
    },
    "llama4_text": {
        "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128, "hidden_size": 5120,
        "vocab_size": 202048, "num_hidden_layers": 48, "intermediate_size": 8192,
        "attention_bias": False, "tie_word_embeddings": False, "num_local_experts": 16,
        "num_experts_per_tok": 1, "interleave_moe_layer_step": 1, "intermediate_size_mlp": 16384,
        "attention_chunk_size": 8192, "no_rope_layer_interval": 4,
    },
    "mistral": {
        "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096,
        "vocab_size": 32000, "num_hidden_layers": 32, "intermediate_size": 14336,
        "sliding_window": 4096, "tie_word_embeddings": False,
    },
    "mixtral": {
        "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096,
        "vocab_size": 32000, "num_hidden_layers": 32, "intermediate_size": 14336,
        "tie_word_embeddings": False, "num_local_experts": 8, "num_experts_per_tok": 2,
    },
    "olmoe": {
        "num_attention_heads": 16, "hidden_size": 2048, "vocab_size": 50304,
        "num_hidden_layers": 16, "intermediate_size": 2048, "attention_bias": False,
        "tie_word_embeddings": False, "num_experts": 64, "num_experts_per_tok": 8,
    },
    "phimoe": {
        "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096,
        "vocab_size": 32064, "num_hidden_layers": 32, "intermediate_size": 6400,
        "attention_bias": False, "tie_word_embeddings": False, "num_local_experts": 16,
        "num_experts_per_tok": 2, "lm_head_bias": False,
    },
    "qwen2": {
        "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_size": 4096,
        "vocab_size": 151936, "num_hidden_layers": 32, "intermediate_size": 22016,
        "sliding_window": 4096, "use_sliding_window": False, "max_window_layers": 28,
        "tie_word_embeddings": False,
    },
    "qwen2_moe": {
        "num_attention_heads": 16, "num_key_value_heads": 16, "hidden_size": 2048,
        "vocab_size": 151936, "num_hidden_layers": 24, "intermediate_size": 5632,
        "sliding_window": 4096, "use_sliding_window": False, "max_window_layers": 28,
        "tie_word_embeddings": False, "num_experts": 60, "num_experts_per_tok": 4,
        "decoder_sparse_step": 1, "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632, "qkv_bias": True,
    },
    "qwen3": {
        "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128, "hidden_size": 4096,
        "vocab_size": 151936, "num_hidden_layers": 32, "intermediate_size": 22016,
        "attention_bias": False, "sliding_window": 4096, "use_sliding_window": False,
        "max_window_layers": 28, "tie_word_embeddings": False,
    },
    "qwen3_moe": {
        "num_attention_heads": 32, "num_key_value_heads": 4, "hidden_size": 2048,
        "vocab_size": 151936, "num_hidden_layers": 24, "intermediate_size": 6144,
        "attention_bias": False, "sliding_window": 4096, "use_sliding_window": False,
        "tie_word_embeddings": False, "num_experts": 128, "num_experts_per_tok": 8,
        "decoder_sparse_step": 1, "moe_intermediate_size": 768,
    },
}
