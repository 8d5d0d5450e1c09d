"""Named presets: real models with their published parameter figures.

Each preset is the model's public `config.json` (only the fields that shape
parameters, attention span and KV cache), converted by the same code as a
user's file, plus the figures its authors published and where. tests/accounting
checks every computed total within 0.5% and active within 2% of those figures.

| preset            | published total / active | source |
|-------------------|--------------------------|--------|
| mixtral-8x7b      | 46.7B / 12.9B | Jiang et al., "Mixtral of Experts", arXiv:2401.04088 |
| mixtral-8x22b     | 141B / 39B    | Mistral AI, "Cheaper, Better, Faster, Stronger" (Apr 2024) |
| deepseek-v3       | 671B / 37B    | DeepSeek-AI, "DeepSeek-V3 Technical Report", arXiv:2412.19437 (MTP module excluded) |
| llama-4-scout     | 109B / 17B    | Meta, "The Llama 4 herd" (Apr 2025); total includes the vision encoder |
| llama-4-maverick  | 400B / 17B    | same; total includes the vision encoder |
| qwen3-30b-a3b     | 30.5B / 3.3B  | Qwen, Qwen3-30B-A3B model card; Qwen3 Technical Report, arXiv:2505.09388 |
| olmoe-1b-7b       | 6.9B / 1.3B   | Muennighoff et al., "OLMoE", arXiv:2409.02060 |
| dense-13b         | 13B / 13B     | Llama-2-13B shape, Touvron et al., arXiv:2307.09288 |
| textbook-8x7b     | 63.0B / 21.0B | teaching model, exact by construction |

Llama 4 presets size the *text* model (what generates tokens); the published
totals also count the vision encoder and projector, 0.87B for both models
(`LLAMA4_VISION_PARAMS`, the meta-device count of transformers'
Llama4VisionModel + Llama4MultiModalProjector at the released vision config).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from moelab.accounting.hf_config import spec_from_hf_config
from moelab.accounting.spec import AttentionSpec, ExplicitSpec, Spec
from moelab.errors import ConfigError

LLAMA4_VISION_PARAMS = 850_960_896 + 20_971_520  # encoder + projector to d_model 5120


@dataclass(frozen=True, kw_only=True)
class Preset:
    name: str
    description: str
    published_total: float
    published_active: float
    source: str
    build: Callable[[], Spec]
    # Parameters inside the published total that the sized model leaves out.
    published_extra: int = 0
    # The published active count leaves out the input embedding table (gpt-oss's model
    # card: "active parameters ... not counting the embeddings"; the LM head stays in).
    active_excludes_embedding: bool = False
    # The resolution of the published (total, active) figures, e.g. (0.1e9, 0.1e9) for
    # "116.8B / 5.1B": the computed count must lie within one unit of them (rounded or
    # truncated, as vendors do both). None: the 0.5% / 2% relative tolerances.
    published_unit: tuple[float, float] | None = None

    def published_active_of(self, active: int, embedding: int) -> int:
        """The computed active count in the convention of `published_active`."""
        return active - embedding if self.active_excludes_embedding else active


def _hf(name: str, **cfg: object) -> Callable[[], Spec]:
    def build() -> Spec:
        return spec_from_hf_config(dict(cfg, _name_or_path=name), source=f"preset {name}", complete=True)

    return build


_MIXTRAL_8X7B = dict(
    model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    num_local_experts=8, num_experts_per_tok=2, tie_word_embeddings=False,
)
_MIXTRAL_8X22B = dict(
    _MIXTRAL_8X7B, vocab_size=32768, hidden_size=6144, intermediate_size=16384,
    num_hidden_layers=56, num_attention_heads=48,
)
_DEEPSEEK_V3 = dict(
    model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
    moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128,
    num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256, num_experts_per_tok=8,
    kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, qk_nope_head_dim=128,
    v_head_dim=128, first_k_dense_replace=3, num_nextn_predict_layers=1,
)
_LLAMA4_SCOUT = dict(
    model_type="llama4_text", vocab_size=202048, hidden_size=5120, intermediate_size=8192,
    intermediate_size_mlp=16384, num_hidden_layers=48, num_attention_heads=40,
    num_key_value_heads=8, head_dim=128, num_local_experts=16, num_experts_per_tok=1,
    interleave_moe_layer_step=1, attention_chunk_size=8192,
)
_LLAMA4_MAVERICK = dict(_LLAMA4_SCOUT, num_local_experts=128, interleave_moe_layer_step=2)
_QWEN3_30B_A3B = dict(
    model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
    moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
    num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
    decoder_sparse_step=1, mlp_only_layers=[],
)
_OLMOE_1B_7B = dict(
    model_type="olmoe", vocab_size=50304, hidden_size=2048, intermediate_size=1024,
    num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
    num_experts=64, num_experts_per_tok=8,
)
_DEEPSEEK_V2_LITE = dict(
    model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
    moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
    n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=6, kv_lora_rank=512, q_lora_rank=None,
    qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, first_k_dense_replace=1,
)
_KIMI_K2 = dict(
    _DEEPSEEK_V3, model_type="kimi_k2", vocab_size=163840, num_attention_heads=64, num_key_value_heads=64,
    n_routed_experts=384, first_k_dense_replace=1, num_nextn_predict_layers=0,
)
_GPT_OSS_120B = dict(
    model_type="gpt_oss", vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=36,
    num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=128, num_experts_per_tok=4,
    sliding_window=128, attention_bias=True,
    layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(36)],
)
_GPT_OSS_20B = dict(
    _GPT_OSS_120B, num_hidden_layers=24, num_local_experts=32,
    layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(24)],
)
_GLM_45_AIR = dict(
    model_type="glm4_moe", vocab_size=151552, hidden_size=4096, intermediate_size=10944,
    moe_intermediate_size=1408, num_hidden_layers=46, num_attention_heads=96, num_key_value_heads=8,
    head_dim=128, n_routed_experts=128, n_shared_experts=1, num_experts_per_tok=8, first_k_dense_replace=1,
    attention_bias=True, use_qk_norm=False, num_nextn_predict_layers=1,
)
_QWEN3_235B_A22B = dict(
    _QWEN3_30B_A3B, hidden_size=4096, intermediate_size=12288, moe_intermediate_size=1536, num_hidden_layers=94,
    num_attention_heads=64, num_key_value_heads=4,
)
_DENSE_13B = dict(
    model_type="llama", vocab_size=32000, hidden_size=5120, intermediate_size=13824,
    num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
)


def textbook_8x7b() -> ExplicitSpec:
    """The teaching model behind the name "8x7B": 8 experts of a full 7.0B each,
    2 routed per token, plus 7.0B of always-on (non-expert) parameters.

    total = 7.0B + 8 x 7.0B = 63.0B; active = 7.0B + 2 x 7.0B = 21.0B; per token
    6 of 8 experts are skipped, saving 6/8 = 75% of the expert compute. (Real
    Mixtral 8x7B shares attention and embeddings and its experts are 5.6B
    each, hence 46.7B, not 56B or 63B.) Attention (for KV cache and attention
    FLOPs) is Mistral-7B's: 32 layers, 32 query and 8 KV heads of 128; the
    shared 7.0B include a 32000 x 4096 embedding and an untied LM head.
    """
    return ExplicitSpec(
        name="textbook-8x7b",
        shared_params=7_000_000_000,
        expert_params=7_000_000_000,
        num_experts=8,
        top_k=2,
        embedding_params=32000 * 4096,
        lm_head_params=32000 * 4096,
        n_layers=32,
        attention=AttentionSpec(n_heads=32, n_kv_heads=8, head_dim=128),
        notes=("teaching model: experts and shared part given as parameter counts",),
    )


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(name="mixtral-8x7b", description="Mixtral 8x7B: 8 experts top-2, GQA",
               published_total=46.7e9, published_active=12.9e9,
               source="arXiv:2401.04088", build=_hf("mixtral-8x7b", **_MIXTRAL_8X7B)),
        Preset(name="mixtral-8x22b", description="Mixtral 8x22B: 8 experts top-2, GQA",
               published_total=141e9, published_active=39e9,
               source="mistral.ai/news/mixtral-8x22b",
               build=_hf("mixtral-8x22b", **_MIXTRAL_8X22B)),
        Preset(name="deepseek-v3",
               description="DeepSeek-V3: MLA, 1 shared + 256 routed top-8, first 3 layers dense",
               published_total=671e9, published_active=37e9,
               source="arXiv:2412.19437", build=_hf("deepseek-v3", **_DEEPSEEK_V3)),
        Preset(name="llama-4-scout",
               description="Llama 4 Scout text model: 16 experts top-1 + shared expert",
               published_total=109e9, published_active=17e9,
               source="ai.meta.com/blog/llama-4-multimodal-intelligence",
               build=_hf("llama-4-scout", **_LLAMA4_SCOUT),
               published_extra=LLAMA4_VISION_PARAMS),
        Preset(name="llama-4-maverick",
               description="Llama 4 Maverick text model: 128 experts top-1 + shared, MoE every other layer",
               published_total=400e9, published_active=17e9,
               source="ai.meta.com/blog/llama-4-multimodal-intelligence",
               build=_hf("llama-4-maverick", **_LLAMA4_MAVERICK),
               published_extra=LLAMA4_VISION_PARAMS),
        Preset(name="qwen3-30b-a3b", description="Qwen3-30B-A3B: 128 experts top-8, GQA, QK-norm",
               published_total=30.5e9, published_active=3.3e9,
               source="huggingface.co/Qwen/Qwen3-30B-A3B", build=_hf("qwen3-30b-a3b", **_QWEN3_30B_A3B)),
        Preset(name="olmoe-1b-7b", description="OLMoE-1B-7B: 64 experts top-8, MHA, QK-norm",
               published_total=6.9e9, published_active=1.3e9,
               source="arXiv:2409.02060", build=_hf("olmoe-1b-7b", **_OLMOE_1B_7B)),
        Preset(name="deepseek-v2-lite",
               description="DeepSeek-V2-Lite: MLA without query bottleneck, 2 shared + 64 routed top-6",
               published_total=15.7e9, published_active=2.4e9, active_excludes_embedding=True,
               published_unit=(0.1e9, 0.1e9), source="arXiv:2405.04434", build=_hf("deepseek-v2-lite", **_DEEPSEEK_V2_LITE)),
        Preset(name="kimi-k2", description="Kimi K2: DeepSeek-V3 shape, 384 routed experts top-8, 64 heads",
               published_total=1.0e12, published_active=32e9, published_unit=(0.1e12, 1e9),
               source="huggingface.co/moonshotai/Kimi-K2-Instruct", build=_hf("kimi-k2", **_KIMI_K2)),
        Preset(name="gpt-oss-120b", description="gpt-oss-120b: 128 experts top-4, sinks, alternating windows",
               published_total=116.8e9, published_active=5.1e9, active_excludes_embedding=True,
               published_unit=(0.1e9, 0.1e9), source="openai.com/index/gpt-oss-model-card", build=_hf("gpt-oss-120b", **_GPT_OSS_120B)),
        Preset(name="gpt-oss-20b", description="gpt-oss-20b: 32 experts top-4, sinks, alternating windows",
               published_total=20.9e9, published_active=3.6e9, active_excludes_embedding=True,
               published_unit=(0.1e9, 0.1e9), source="openai.com/index/gpt-oss-model-card", build=_hf("gpt-oss-20b", **_GPT_OSS_20B)),
        Preset(name="glm-4.5-air", description="GLM-4.5-Air: 128 routed + 1 shared top-8, first layer dense",
               published_total=106e9, published_active=12e9, active_excludes_embedding=True,
               published_unit=(1e9, 1e9), source="huggingface.co/zai-org/GLM-4.5-Air", build=_hf("glm-4.5-air", **_GLM_45_AIR)),
        Preset(name="qwen3-235b-a22b", description="Qwen3-235B-A22B: 128 experts top-8, GQA, QK-norm",
               published_total=235e9, published_active=22e9, published_unit=(1e9, 1e9),
               source="huggingface.co/Qwen/Qwen3-235B-A22B", build=_hf("qwen3-235b-a22b", **_QWEN3_235B_A22B)),
        Preset(name="dense-13b", description="dense baseline shaped like Llama-2-13B",
               published_total=13e9, published_active=13e9,
               source="arXiv:2307.09288", build=_hf("dense-13b", **_DENSE_13B)),
        Preset(name="textbook-8x7b",
               description="teaching model: 8 experts of a full 7B each + 7B shared, top-2",
               published_total=63.0e9, published_active=21.0e9,
               source="by construction", build=textbook_8x7b),
    ]
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown preset {name!r}; presets: {', '.join(PRESETS)}"
        ) from None
