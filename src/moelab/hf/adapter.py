"""The Hugging Face <-> moelab mapping: configs (both ways) and tensor names (one table).

Families: Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2, DeepSeek-V3 (and Kimi K2,
its config under another model_type), gpt-oss (MoE) and Llama / Mistral (dense). Export
covers the first four and the dense ones; the others are refused by name.

Tensor names. moelab's names are HF's without the ``model.`` prefix, except the MoE
block, which `_TEMPLATES` rewrites. Expert weights come in two on-disk layouts:
  - stacked (HF transformers 5 in memory, and ours): ``experts.gate_up_proj [E, 2F, D]``
    (gate rows then up rows), ``experts.down_proj [E, D, F]``;
  - per expert (what ``save_pretrained`` writes, and every published checkpoint):
    Mixtral ``block_sparse_moe.experts.N.w1`` (gate), ``w3`` (up), ``w2`` (down);
    Qwen / OLMoE ``mlp.experts.N.gate_proj``, ``up_proj``, ``down_proj``.
Both are read on import; export writes the per-expert layout, which transformers 4.x
and 5.x both load.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from moelab.accounting.hf_config import check_config_fields, library_config
from moelab.errors import ConfigError
from moelab.model.config import ROPE_SCALINGS, ModelConfig, RopeScaling, YarnRope
from moelab.moe import MoEConfig

log = logging.getLogger(__name__)

MOE_FAMILIES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe")
DENSE_FAMILIES = ("llama", "mistral")
IMPORT_ONLY_FAMILIES = ("deepseek_v2", "deepseek_v3", "kimi_k2", "gpt_oss", "glm4_moe", "llama4_text", "dots1",
                        "granitemoe", "granitemoeshared", "ernie4_5_moe", "hunyuan_v1_moe", "dbrx")
GRANITE = ("granitemoe", "granitemoeshared")
EXPORT_FAMILIES = MOE_FAMILIES + DENSE_FAMILIES
FAMILIES = MOE_FAMILIES + DENSE_FAMILIES + IMPORT_ONLY_FAMILIES
DEEPSEEK = ("deepseek_v2", "deepseek_v3", "kimi_k2")
# Sigmoid routers whose checkpoints carry the selection bias (`e_score_correction_bias`).
# Families whose checkpoints use YaRN RoPE (their modeling code applies it as moelab does).
YARN_FAMILIES = (*DEEPSEEK, "gpt_oss")
CORRECTION_BIAS_FAMILIES = ("deepseek_v3", "kimi_k2", "glm4_moe", "dots1", "ernie4_5_moe")

ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
}

# moelab key -> HF key. `{moe}` is the family's MoE module name, `{router}` its router's
# (gpt-oss: "router", the others "gate"), `{shared}` its shared expert's; first match wins.
_TEMPLATES: tuple[tuple[str, str], ...] = (
    (r"layers\.(\d+)\.mlp\.router\.(weight|bias)", r"model.layers.\1.{moe}.{router}.\2"),
    (r"layers\.(\d+)\.mlp\.router\.expert_bias", r"model.layers.\1.{moe}.gate.e_score_correction_bias"),
    (r"layers\.(\d+)\.mlp\.shared_experts\.(\w+)\.weight", r"model.layers.\1.{moe}.{shared}.\2.weight"),
    (r"layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)", r"model.layers.\1.{moe}.experts.\2"),
    (r"lm_head\.weight", r"lm_head.weight"),
    (r"(.+)", r"model.\1"),
)
_ROUTER_NAMES = {"gpt_oss": "router", "llama4_text": "router"}
# Granite names every projection its own way (fused shared gate/up: see `tensor_from_hf`).
_GRANITE_TEMPLATES: tuple[tuple[str, str], ...] = (
    (r"layers\.(\d+)\.mlp\.router\.weight", r"model.layers.\1.block_sparse_moe.router.layer.weight"),
    (r"layers\.(\d+)\.mlp\.experts\.gate_up_proj", r"model.layers.\1.block_sparse_moe.input_linear.weight"),
    (r"layers\.(\d+)\.mlp\.experts\.down_proj", r"model.layers.\1.block_sparse_moe.output_linear.weight"),
    (r"layers\.(\d+)\.mlp\.shared_experts\.(gate|up)_proj\.weight", r"model.layers.\1.shared_mlp.input_linear.weight"),
    (r"layers\.(\d+)\.mlp\.shared_experts\.down_proj\.weight", r"model.layers.\1.shared_mlp.output_linear.weight"),
)
_SHARED_NAMES = dict.fromkeys((*DEEPSEEK, "glm4_moe", "dots1", "ernie4_5_moe"), "shared_experts")
# Per-expert legacy names: (gate, up, down).
_EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2")}
_DEFAULT_EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")
# Checkpoint tensors that carry no weights (old checkpoints stored RoPE tables).
IGNORED_HF_KEYS = re.compile(r".*rotary_emb\.inv_freq$")
_STACKED = re.compile(r"layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")


def moe_prefixes(family: str) -> tuple[str, ...]:
    """Names the MoE module goes by on disk, the export name first."""
    if family == "llama4_text":
        return ("feed_forward",)
    return ("block_sparse_moe", "mlp") if family == "mixtral" else ("mlp",)


def hf_key(moelab_key: str, family: str, moe: str | None = None) -> str:
    """The HF name of a moelab tensor (stacked layout for experts)."""
    moe = moe or moe_prefixes(family)[0]
    if family in GRANITE:
        for pattern, template in _GRANITE_TEMPLATES:
            m = re.fullmatch(pattern, moelab_key)
            if m:
                return m.expand(template)
    if family == "ernie4_5_moe" and moelab_key.endswith("mlp.router.expert_bias"):
        return "model." + moelab_key.replace("mlp.router.expert_bias", "mlp.moe_statics.e_score_correction_bias")
    if family == "hunyuan_v1_moe":
        moelab_key = re.sub(r"self_attn\.q_norm", "self_attn.query_layernorm", moelab_key)
        moelab_key = re.sub(r"self_attn\.k_norm", "self_attn.key_layernorm", moelab_key)
        moelab_key = re.sub(r"mlp\.router\.weight$", "mlp.gate.wg.weight", moelab_key)
        moelab_key = re.sub(r"mlp\.shared_experts\.", "mlp.shared_mlp.", moelab_key)
    if family == "llama4_text":  # every FFN, dense or MoE, is `feed_forward`
        moelab_key = re.sub(r"^(layers\.\d+)\.mlp\.(?!router|experts\.|shared_experts)", r"\1.feed_forward.", moelab_key)
    for pattern, template in _TEMPLATES:
        m = re.fullmatch(pattern, moelab_key)
        if m:
            template = template.replace("{moe}", moe).replace("{router}", _ROUTER_NAMES.get(family, "gate"))
            return m.expand(template.replace("{shared}", _SHARED_NAMES.get(family, "shared_expert")))
    raise AssertionError("the last template matches everything")


def per_expert_keys(layer: int, expert: int, family: str, moe: str | None = None) -> tuple[str, str, str]:
    """HF names of one expert's (gate, up, down) weights in the per-expert layout."""
    moe = moe or moe_prefixes(family)[0]
    names = _EXPERT_NAMES.get(family, _DEFAULT_EXPERT_NAMES)
    return tuple(f"model.layers.{layer}.{moe}.experts.{expert}.{n}.weight" for n in names)  # type: ignore[return-value]


_GPT_OSS_EXPERTS = re.compile(r"layers\.\d+\.mlp\.experts\.(gate_up_proj|down_proj)(_bias)?$")


def tensor_from_hf(family: str, moelab_key: str, t: torch.Tensor) -> torch.Tensor:
    """An HF tensor in moelab's layout (most families: as stored).

    gpt-oss stores stacked experts as ``x @ W`` operands with gate and up *interleaved*
    along the output columns: ``gate_up_proj [E, D, 2F]`` (columns g0 u0 g1 u1 ...),
    ``down_proj [E, F, D]``; moelab holds ``[E, 2F, D]`` with gate rows then up rows, and
    ``[E, D, F]``; the gate/up bias ``[E, 2F]`` is de-interleaved the same way. Llama 4
    stores the same ``x @ W`` operands with gate columns first: a transpose. Granite's
    shared MLP fuses gate and up rows in one ``input_linear``: each is half of it.
    """
    if family == "ernie4_5_moe" and moelab_key.endswith("router.expert_bias"):
        return t.reshape(-1)  # stored [1, E] (one "group")
    if family == "granitemoeshared" and re.search(r"shared_experts\.(gate|up)_proj\.weight$", moelab_key):
        gate, up = t.chunk(2, dim=0)  # `shared_mlp.input_linear` is [gate | up] rows
        return (gate if "gate_proj" in moelab_key else up).contiguous()
    m = _GPT_OSS_EXPERTS.search(moelab_key) if family in ("gpt_oss", "llama4_text") else None
    if m is None:
        return t
    if family == "llama4_text":  # [E, D, 2F] (gate columns then up) and [E, F, D]: transposed only
        return t.transpose(1, 2).contiguous()
    which, bias = m.group(1), m.group(2)
    if which == "gate_up_proj":
        t = t.transpose(-1, -2) if not bias else t  # [E, 2F, D] / [E, 2F], rows interleaved
        return torch.cat([t[:, 0::2], t[:, 1::2]], dim=1).contiguous()
    return t if bias else t.transpose(1, 2).contiguous()


def tensor_to_hf(family: str, moelab_key: str, t: torch.Tensor) -> torch.Tensor:
    """The inverse of `tensor_from_hf` (Granite's fused shared gate/up is joined by the caller)."""
    if family == "ernie4_5_moe" and moelab_key.endswith("router.expert_bias"):
        return t.reshape(1, -1)
    m = _GPT_OSS_EXPERTS.search(moelab_key) if family in ("gpt_oss", "llama4_text") else None
    if m is None:
        return t
    if family == "llama4_text":
        return t.transpose(1, 2).contiguous()
    which, bias = m.group(1), m.group(2)
    if which == "gate_up_proj":
        half = t.shape[1] // 2
        inter = torch.empty_like(t)
        inter[:, 0::2], inter[:, 1::2] = t[:, :half], t[:, half:]  # gate and up rows interleaved again
        return inter if bias else inter.transpose(-1, -2).contiguous()
    return t if bias else t.transpose(1, 2).contiguous()


def stacked_expert_param(moelab_key: str) -> tuple[int, str] | None:
    """(layer, "gate_up_proj" | "down_proj") for a stacked expert tensor, else None."""
    m = _STACKED.search(moelab_key)
    return (int(m.group(1)), m.group(2)) if m else None


# ---------------------------------------------------------------------------------------
# HF config.json -> ModelConfig


@dataclass(frozen=True)
class ImportedConfig:
    config: ModelConfig
    family: str


class _Reader:
    """Typed access to one config dict; every error names the file and the field."""

    def __init__(self, d: dict[str, Any], source: str, family: str):
        self.d, self.source, self.family = d, source, family

    def error(self, msg: str) -> ConfigError:
        return ConfigError(f"{self.source}: {msg} (model_type {self.family!r})")

    def int(self, *names: str, default: int | None = None) -> int:
        for name in names:
            value = self.d.get(name)
            if value is not None:
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise self.error(f"field {name!r} must be an integer >= 0, got {value!r}")
                return value
        if default is None:
            raise self.error(f"field {names[0]!r} is missing, expected an integer")
        return default

    def get(self, name: str, default: Any = None) -> Any:
        value = self.d.get(name)
        return default if value is None else value

    def require_false(self, name: str, why: str) -> None:
        if self.d.get(name):
            raise self.error(f"field {name!r}={self.d[name]!r} is not supported: {why}")


def _rope_theta(r: _Reader, *, allow_yarn: bool = False) -> float:
    params = r.get("rope_parameters") or r.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise r.error(f"field 'rope_parameters' must be an object, got {params!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    allowed = ("default", None, *ROPE_SCALINGS) + (("yarn",) if allow_yarn else ())
    if rope_type not in allowed:
        names = ", ".join(repr(t) for t in ("default", *ROPE_SCALINGS, *(("yarn",) if allow_yarn else ())))
        raise r.error(f"RoPE scaling {rope_type!r} is not supported (rope_type {names})")
    theta = params.get("rope_theta", r.get("rope_theta", 10000.0))
    if not isinstance(theta, int | float) or theta <= 0:
        raise r.error(f"rope_theta must be a positive number, got {theta!r}")
    return float(theta)


def _rope_scaling(r: _Reader) -> RopeScaling | None:
    """linear / llama3 RoPE scaling from `rope_parameters` (transformers' names), else None."""
    params = r.get("rope_parameters") or r.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type")) if isinstance(params, dict) else None
    if kind not in ROPE_SCALINGS:
        return None
    keys = {"factor": "factor", "low_freq_factor": "low_freq_factor", "high_freq_factor": "high_freq_factor",
            "original_max_position_embeddings": "original_max_position_embeddings"}
    if kind == "linear":
        keys = {"factor": "factor"}
    try:
        return RopeScaling(kind=kind, **{ours: params[theirs] for ours, theirs in keys.items() if theirs in params})
    except (ConfigError, TypeError) as e:
        raise r.error(f"field 'rope_parameters' ({kind} RoPE): {e}") from None


def _qwen_window(r: _Reader, n_layers: int) -> int | None:
    """Qwen2-MoE: one window for every layer, or none (mixed layers are not supported)."""
    window = r.get("sliding_window")
    types = r.get("layer_types")
    if types is None:
        first = r.int("max_window_layers", default=28)
        use = bool(r.get("use_sliding_window", False))
        types = [
            "sliding_attention" if use and (i + 1) % 2 and i < first else "full_attention"
            for i in range(n_layers)
        ]
    kinds = set(types)
    if kinds <= {"full_attention"} or not window:
        return None
    if kinds == {"sliding_attention"}:
        return int(window)
    raise r.error(f"layer_types mixes sliding and full attention ({types}); moelab uses one window for all layers")


def config_from_hf(d: dict[str, Any], *, source: str = "config.json") -> ImportedConfig:
    """Translate a transformers ``config.json`` dict into a `ModelConfig`.

    Raises `ConfigError` naming `source`, the field, and the supported families.
    """
    family = d.get("model_type")
    if family not in FAMILIES:
        raise ConfigError(
            f"{source}: model_type {family!r} is not supported for import; supported families: "
            f"{', '.join(FAMILIES)}"
        )
    quant = d.get("quantization_config")
    method = quant.get("quant_method") if isinstance(quant, dict) else quant
    if quant and not (family == "gpt_oss" and method == "mxfp4"):
        # gpt-oss's MXFP4 experts are dequantised at load (`moelab.hf.mxfp4`); nothing else is.
        raise ConfigError(
            f"{source}: field 'quantization_config' (quant_method {method!r}) is not supported: moelab imports "
            f"floating-point weights and gpt-oss's MXFP4 experts only (a DeepSeek-V3 fp8 checkpoint needs "
            f"dequantising first, e.g. with transformers' dequantize=True)"
        )
    if family in IMPORT_ONLY_FAMILIES:
        # Read as transformers reads it: its class defaults for missing keys (see docs/size.md).
        check_config_fields(d, source, family)
        d, _ = library_config(d, source=source)
        readers = {"gpt_oss": _gpt_oss_config, "glm4_moe": _glm4_moe_config, "llama4_text": _llama4_text_config,
                   "dots1": _glm4_moe_config, "granitemoe": _granite_config, "granitemoeshared": _granite_config,
                   "ernie4_5_moe": _ernie_config, "hunyuan_v1_moe": _hunyuan_config, "dbrx": _dbrx_config}
        reader = readers.get(family, _deepseek_config)
        return ImportedConfig(reader(_Reader(d, source, family)), family)
    r = _Reader(d, source, family)
    act = r.get("hidden_act", "silu")
    if act != "silu":
        raise r.error(f"hidden_act {act!r} is not supported (moelab experts are SwiGLU: silu)")
    n_layers = r.int("num_hidden_layers")
    d_model = r.int("hidden_size")
    n_heads = r.int("num_attention_heads")
    common: dict[str, Any] = dict(
        vocab_size=r.int("vocab_size"),
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=r.int("num_key_value_heads", default=n_heads),
        head_dim=r.int("head_dim", default=d_model // max(n_heads, 1)),
        max_seq_len=r.int("max_position_embeddings", default=4096),
        rope_theta=_rope_theta(r),
        rope_scaling=_rope_scaling(r),
        norm_eps=float(r.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(r.get("tie_word_embeddings", False)),
        d_ff=r.int("intermediate_size"),
    )
    if family in ("llama", "mistral", "mixtral"):
        r.require_false("attention_bias", "moelab has no bias on attention projections for this family")
        r.require_false("mlp_bias", "moelab FFNs have no bias")
        window = r.get("sliding_window") if family != "llama" else None
        common["sliding_window"] = int(window) if window else None
    if family in DENSE_FAMILIES:
        return ImportedConfig(ModelConfig(**common), family)

    num_experts = r.int("num_local_experts", "num_experts")
    top_k = r.int("num_experts_per_tok")
    moe: dict[str, Any] = dict(d_model=d_model, num_experts=num_experts, top_k=top_k, aux_loss_coef=0.0)
    if family == "mixtral":
        moe.update(d_expert=common["d_ff"], norm_topk_prob=True)
    elif family == "olmoe":
        r.require_false("attention_bias", "OLMoE's attention bias covers o_proj, which moelab does not have")
        moe.update(d_expert=common["d_ff"], norm_topk_prob=bool(r.get("norm_topk_prob", False)))
        clip = r.get("clip_qkv")
        common.update(qk_norm="full", clip_qkv=float(clip) if clip is not None else None)
    else:  # qwen2_moe, qwen3_moe
        moe.update(d_expert=r.int("moe_intermediate_size"), norm_topk_prob=bool(r.get("norm_topk_prob", False)))
        step = r.int("decoder_sparse_step", default=1)
        if step < 1:
            raise r.error(f"field 'decoder_sparse_step' must be >= 1, got {step}")
        dense = r.get("mlp_only_layers", [])
        if not isinstance(dense, list) or not all(isinstance(i, int) for i in dense):
            raise r.error(f"field 'mlp_only_layers' must be a list of layer indices, got {dense!r}")
        common.update(moe_layer_freq=step, dense_layers=tuple(i for i in sorted(set(dense)) if i < n_layers))
        if family == "qwen2_moe":
            common["attn_bias"] = bool(r.get("qkv_bias", True))
            common["sliding_window"] = _qwen_window(r, n_layers)
            moe.update(
                num_shared_experts=1,
                d_shared_expert=r.int("shared_expert_intermediate_size"),
                shared_expert_gate=True,
            )
        else:
            r.require_false("attention_bias", "Qwen3-MoE's attention bias covers o_proj, which moelab does not have")
            common["qk_norm"] = "head"
            # transformers' Qwen3MoeConfig drops the window unless use_sliding_window.
            window = r.get("sliding_window") if r.get("use_sliding_window", False) else None
            common["sliding_window"] = int(window) if window else None
    try:
        cfg = ModelConfig(**common, moe=MoEConfig(**moe))
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from e
    return ImportedConfig(cfg, family)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _rope_yarn(r: _Reader) -> tuple[YarnRope | None, float | None]:
    """(YaRN scaling, softmax-scale multiplier) from `rope_parameters`, as transformers'
    `_compute_yarn_parameters` reads them; (None, None) for plain RoPE. The multiplier is
    DeepSeek's `mscale_all_dim` correction (mscale^2 on 1/sqrt(d)), None elsewhere."""
    params = r.get("rope_parameters") or r.get("rope_scaling") or {}
    if params.get("rope_type", params.get("type")) != "yarn":
        return None, None
    factor = params.get("factor")
    orig = params.get("original_max_position_embeddings")
    if not isinstance(factor, int | float) or not isinstance(orig, int):
        raise r.error("yarn RoPE needs numeric 'rope_parameters.factor' and int "
                      f"'rope_parameters.original_max_position_embeddings', got {factor!r} / {orig!r}")
    attention_factor = params.get("attention_factor")
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    yarn = YarnRope(factor=float(factor), original_max_position_embeddings=orig,
                    beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
                    truncate=bool(params.get("truncate", True)), attention_factor=float(attention_factor))
    softmax = _yarn_mscale(factor, mscale_all_dim) ** 2 if mscale_all_dim else None
    return yarn, softmax


def _common(r: _Reader, *, head_dim: int | None = None) -> dict[str, Any]:
    act = r.get("hidden_act", "silu")
    if act != "silu":
        raise r.error(f"hidden_act {act!r} is not supported (moelab experts are SwiGLU: silu)")
    d_model, n_heads = r.int("hidden_size"), r.int("num_attention_heads")
    return dict(
        vocab_size=r.int("vocab_size"),
        d_model=d_model,
        n_layers=r.int("num_hidden_layers"),
        n_heads=n_heads,
        head_dim=head_dim or r.int("head_dim", default=d_model // max(n_heads, 1)),
        max_seq_len=r.int("max_position_embeddings", default=4096),
        rope_theta=_rope_theta(r, allow_yarn=r.family in YARN_FAMILIES),
        rope_yarn=_rope_yarn(r)[0],
        rope_scaling=_rope_scaling(r),
        norm_eps=float(r.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(r.get("tie_word_embeddings", False)),
        d_ff=r.int("intermediate_size"),
    )


def _build(r: _Reader, common: dict[str, Any], moe: dict[str, Any]) -> ModelConfig:
    try:
        return ModelConfig(**common, moe=MoEConfig(**moe))
    except ConfigError as e:
        raise ConfigError(f"{r.source}: {e}") from e


def _deepseek_config(r: _Reader) -> ModelConfig:
    """DeepSeek-V2 / V3 (Kimi K2): MLA attention, the first `first_k_dense_replace` layers
    dense, the rest MoE with `n_shared_experts` always-on experts of the routed width.

    V3 routes with sigmoid affinities, the `e_score_correction_bias` (selection only) and
    group-limited top-k (groups scored by their top-2 sum), renormalised when
    `norm_topk_prob`; V2 with a softmax, greedy or `group_limited_greedy` (groups scored
    by their max), never renormalised (its modeling code ignores `norm_topk_prob`). Both
    scale by `routed_scaling_factor`. Both RoPE layouts are pairwise (V2's complex
    multiply, V3's `rope_interleave`), the same rotation.
    """
    v2 = r.family == "deepseek_v2"
    r.require_false("mlp_bias", "moelab FFNs have no bias")
    nope, rope = r.int("qk_nope_head_dim"), r.int("qk_rope_head_dim")
    q_rank = r.get("q_lora_rank")
    if q_rank is not None:
        q_rank = r.int("q_lora_rank")
    bias = bool(r.get("attention_bias", False))
    common = _common(r, head_dim=nope + rope)
    softmax = _rope_yarn(r)[1]
    if softmax is not None:  # transformers' yarn_apply_mscale
        common["attn_scale"] = softmax * (nope + rope) ** -0.5
    common.update(
        attention="mla", q_lora_rank=q_rank, kv_lora_rank=r.int("kv_lora_rank"), rotary_dim=rope,
        v_head_dim=r.int("v_head_dim"), rope_interleave=True if v2 else bool(r.get("rope_interleave", True)),
        attn_bias=bias, o_bias=bias, first_dense_layers=min(r.int("first_k_dense_replace", default=0), common["n_layers"]),
    )
    d_expert = r.int("moe_intermediate_size")
    moe: dict[str, Any] = dict(
        d_model=common["d_model"], d_expert=d_expert, num_experts=r.int("n_routed_experts", "num_local_experts"),
        top_k=r.int("num_experts_per_tok"), num_shared_experts=r.int("n_shared_experts", default=0),
        d_shared_expert=d_expert, routed_scaling_factor=float(r.get("routed_scaling_factor", 1.0)), aux_loss_coef=0.0,
    )
    if v2:
        method = r.get("topk_method", "greedy")
        if method not in ("greedy", "group_limited_greedy"):
            raise r.error(f"field 'topk_method'={method!r} is not supported (greedy, group_limited_greedy)")
        grouped = method == "group_limited_greedy"
        moe.update(router="softmax", norm_topk_prob=False,
                   n_group=r.int("n_group") if grouped else 1, topk_group=r.int("topk_group") if grouped else 1)
    else:
        moe.update(router="sigmoid", norm_topk_prob=bool(r.get("norm_topk_prob", True)),
                   n_group=r.int("n_group", default=1), topk_group=r.int("topk_group", default=1))
    return _build(r, common, moe)


def _sigmoid_router(r: _Reader) -> dict[str, Any]:
    """DeepSeek-V3's router, as GLM-4.5 also uses it."""
    return dict(router="sigmoid", norm_topk_prob=bool(r.get("norm_topk_prob", True)),
                n_group=r.int("n_group", default=1), topk_group=r.int("topk_group", default=1),
                routed_scaling_factor=float(r.get("routed_scaling_factor", 1.0)))


def _glm4_moe_config(r: _Reader) -> ModelConfig:
    """GLM-4.5 / 4.6 (`glm4_moe`) and dots.llm1 (`dots1`): GQA, then DeepSeek-V3's MoE
    (sigmoid router, correction bias, groups, `n_shared_experts` shared experts of the
    routed width) after the first `first_k_dense_replace` dense layers.

    GLM: q/k/v biases (`attention_bias`), optional per-head QK-norm (`use_qk_norm`), RoPE on
    the first `partial_rotary_factor` of each head. dots1: `attention_bias` on q/k/v/o,
    per-head QK-norm always, sliding windows by `layer_types`.
    """
    common = _common(r)
    dots = r.family == "dots1"
    params = r.get("rope_parameters") or {}
    # Only GLM's modeling code reads partial_rotary_factor (dots1's ignores it).
    factor = 1.0 if dots else params.get("partial_rotary_factor", r.get("partial_rotary_factor", 1.0))
    rotary = int(common["head_dim"] * factor)
    if dots:
        n, window = common["n_layers"], r.get("sliding_window")
        sliding = tuple(i for i, t in enumerate(r.get("layer_types") or []) if t == "sliding_attention")
        common.update(sliding_window=int(window) if window and sliding else None,
                      sliding_layers=sliding if window and sliding and len(sliding) < n else None,
                      o_bias=bool(r.get("attention_bias", False)))
    common.update(
        n_kv_heads=r.int("num_key_value_heads", default=common["n_heads"]),
        attn_bias=bool(r.get("attention_bias", False)),
        qk_norm="head" if dots or r.get("use_qk_norm", False) else None,
        rotary_dim=rotary if rotary != common["head_dim"] else None,
        first_dense_layers=min(r.int("first_k_dense_replace", default=0), common["n_layers"]),
    )
    d_expert = r.int("moe_intermediate_size")
    moe = dict(
        d_model=common["d_model"], d_expert=d_expert, num_experts=r.int("n_routed_experts", "num_local_experts"),
        top_k=r.int("num_experts_per_tok"), num_shared_experts=r.int("n_shared_experts", default=0),
        d_shared_expert=d_expert, aux_loss_coef=0.0, **_sigmoid_router(r),
    )
    return _build(r, common, moe)


def _llama4_text_config(r: _Reader) -> ModelConfig:
    """Llama 4 (text): MoE at `moe_layers` (top-k of sigmoid scores, the weight applied to
    the expert's *input*, plus one shared expert of the routed width), dense layers of
    `intermediate_size_mlp`; NoPE on layers with `no_rope_layers[i] == 0`, pairwise RoPE
    and a weightless L2 QK-norm (`use_qk_norm`) on the others.

    Chunked attention (`attention_chunk_size`) and the NoPE layers' attention temperature
    (from position `floor_scale` on) are not implemented: below both they are the identity
    (full causal attention, temperature 1), so `max_seq_len` is capped there (logged).
    """
    common = _common(r)
    n = common["n_layers"]
    rope_layers = r.get("no_rope_layers") or [1] * n
    nope = tuple(i for i, use in enumerate(rope_layers) if not use)
    moe_layers = set(r.get("moe_layers") or [])
    cap = common["max_seq_len"]
    types = r.get("layer_types") or []
    if "chunked_attention" in types and r.get("attention_chunk_size"):
        cap = min(cap, r.int("attention_chunk_size"))
    if nope and r.get("attn_temperature_tuning", False):
        cap = min(cap, r.int("floor_scale", default=8192) - 1)
    if cap < common["max_seq_len"]:
        log.warning("%s: llama4 chunked attention / attention temperature are not implemented; max_seq_len capped "
                    "at %d (below it they change nothing)", r.source, cap)
    bias = bool(r.get("attention_bias", False))
    common.update(
        n_kv_heads=r.int("num_key_value_heads", default=common["n_heads"]), attn_bias=bias, o_bias=bias,
        rope_interleave=True, nope_layers=nope, qk_norm="l2" if r.get("use_qk_norm", False) else None,
        max_seq_len=cap, d_ff=r.int("intermediate_size_mlp"),
        dense_layers=tuple(i for i in range(n) if i not in moe_layers),
    )
    d_expert = r.int("intermediate_size")
    moe = dict(
        d_model=common["d_model"], d_expert=d_expert, num_experts=r.int("num_local_experts"),
        top_k=r.int("num_experts_per_tok"), router="sigmoid", norm_topk_prob=False, weight_on_input=True,
        num_shared_experts=1, d_shared_expert=d_expert, aux_loss_coef=0.0,
    )
    return _build(r, common, moe)


def _granite_config(r: _Reader) -> ModelConfig:
    """GraniteMoE (and -shared): Mixtral-style top-k (softmax over the k kept logits) with
    `attention_bias` on q/k/v/o and muP-style scalars (`embedding_multiplier`,
    `residual_multiplier`, `attention_multiplier` as the softmax scale, `logits_scaling`);
    the shared variant adds one always-on MLP of `shared_intermediate_size`."""
    common = _common(r)
    bias = bool(r.get("attention_bias", False))
    common.update(
        n_kv_heads=r.int("num_key_value_heads", default=common["n_heads"]), attn_bias=bias, o_bias=bias,
        embedding_multiplier=float(r.get("embedding_multiplier", 1.0)),
        residual_multiplier=float(r.get("residual_multiplier", 1.0)),
        attn_scale=float(r.get("attention_multiplier", 1.0)), logits_scaling=float(r.get("logits_scaling", 1.0)),
    )
    shared = r.int("shared_intermediate_size", default=0) if r.family == "granitemoeshared" else 0
    moe = dict(
        d_model=common["d_model"], d_expert=common["d_ff"], num_experts=r.int("num_local_experts", "num_experts"),
        top_k=r.int("num_experts_per_tok"), router="softmax", norm_topk_prob=True, aux_loss_coef=0.0,
        num_shared_experts=1 if shared else 0, d_shared_expert=shared or None,
    )
    return _build(r, common, moe)


def _ernie_config(r: _Reader) -> ModelConfig:
    """ERNIE-4.5-MoE: softmax router whose top-k is chosen on probabilities plus the
    `moe_statics` correction bias (weights: the plain probabilities, renormalised);
    `moe_num_shared_experts` shared experts; MoE on layers i with (i + 1) % interval == 0
    and start <= i <= end (`moe_layer_*`); pairwise RoPE."""
    r.require_false("use_bias", "moelab's attention has no o_proj-only bias form here and its FFNs have no bias")
    common = _common(r)
    n = common["n_layers"]
    start, end = r.int("moe_layer_start_index", default=0), r.get("moe_layer_end_index", n - 1)
    end = n - 1 if end == -1 else end
    interval = r.int("moe_layer_interval", default=1)
    if interval < 1:
        raise r.error(f"field 'moe_layer_interval' must be an int >= 1, got {interval}")
    moe_layers = {i for i in range(n) if (i + 1) % interval == 0 and start <= i <= end}
    common.update(n_kv_heads=r.int("num_key_value_heads", default=common["n_heads"]), rope_interleave=True,
                  dense_layers=tuple(i for i in range(n) if i not in moe_layers))
    d_expert = r.int("moe_intermediate_size")
    moe = dict(
        d_model=common["d_model"], d_expert=d_expert, num_experts=r.int("moe_num_experts"), top_k=r.int("moe_k"),
        router="softmax", norm_topk_prob=True, selection_bias=True, aux_loss_coef=0.0,
        num_shared_experts=r.int("moe_num_shared_experts", default=0), d_shared_expert=d_expert,
    )
    return _build(r, common, moe)


def _hunyuan_config(r: _Reader) -> ModelConfig:
    """Hunyuan-v1-MoE (Hunyuan-A13B): per-head QK-norm *after* RoPE (`query_layernorm`,
    `key_layernorm`), `attention_bias` on q/k/v/o, every layer MoE: softmax top-k
    (`moe_topk`, one value for all layers), renormalised, plus one shared MLP; experts and
    the shared MLP both of `intermediate_size`."""
    common = _common(r)
    top_k = r.get("moe_topk")
    if isinstance(top_k, list):
        if len(set(top_k)) != 1:
            raise r.error(f"field 'moe_topk' varies per layer ({top_k}); moelab has one top-k per model")
        top_k = top_k[0]
    num_experts = r.get("num_experts")
    if isinstance(num_experts, list):
        if len(set(num_experts)) != 1:
            raise r.error(f"field 'num_experts' varies per layer ({num_experts}); moelab has one expert count")
        num_experts = num_experts[0]
    if r.get("use_mixed_mlp_moe") is False or r.get("num_shared_expert") not in (None, 1, [1]):
        raise r.error("only the shared-MLP form (one shared MLP per layer) is supported")
    bias = bool(r.get("attention_bias", False))
    common.update(n_kv_heads=r.int("num_key_value_heads", default=common["n_heads"]), attn_bias=bias, o_bias=bias,
                  qk_norm="head_after_rope")
    moe = dict(
        d_model=common["d_model"], d_expert=common["d_ff"], num_experts=int(num_experts), top_k=int(top_k),
        router="softmax", norm_topk_prob=True, aux_loss_coef=0.0, num_shared_experts=1,
        d_shared_expert=common["d_ff"],
    )
    return _build(r, common, moe)


def _dbrx_config(r: _Reader) -> ModelConfig:
    """DBRX: LayerNorm without bias (`norm="layer"`), one fused ``Wqkv`` with `clip_qkv`
    on its output (split into q/k/v on load: the clamp is elementwise, so clamping each
    part is the same), every layer MoE: softmax over all experts, top-k, the k weights
    divided by their p-norm (`moe_normalize_expert_weights`: 1 is moelab's renormalisation,
    null none; other p are refused); experts ``w1`` / ``v1`` / ``w2`` each ``[E F, D]``."""
    attn, ffn = r.get("attn_config") or {}, r.get("ffn_config") or {}
    if not isinstance(attn, dict) or not isinstance(ffn, dict):
        raise r.error("fields 'attn_config' and 'ffn_config' must be objects")
    act = (ffn.get("ffn_act_fn") or {}).get("name", "silu")
    if act != "silu":
        raise r.error(f"field 'ffn_config.ffn_act_fn.name'={act!r} is not supported (moelab experts are SwiGLU: silu)")
    p = ffn.get("moe_normalize_expert_weights", 1.0)
    if p not in (None, 1, 1.0):
        raise r.error(f"field 'ffn_config.moe_normalize_expert_weights'={p!r} is not supported (1: renormalise "
                      "the k weights to sum to 1, null: keep them)")
    sub = _Reader({**attn, **ffn}, r.source, r.family)
    d_model, n_heads = r.int("d_model"), r.int("n_heads")
    F_ = sub.int("ffn_hidden_size")
    clip = attn.get("clip_qkv")
    moe = MoEConfig(d_model=d_model, d_expert=F_, num_experts=sub.int("moe_num_experts"), top_k=sub.int("moe_top_k"),
                    norm_topk_prob=p is not None)
    return ModelConfig(
        vocab_size=r.int("vocab_size"), d_model=d_model, n_layers=r.int("n_layers"), n_heads=n_heads,
        n_kv_heads=sub.int("kv_n_heads", default=n_heads), head_dim=d_model // max(n_heads, 1),
        max_seq_len=r.int("max_seq_len", default=2048), rope_theta=_rope_theta(r), rope_scaling=_rope_scaling(r),
        norm_eps=1e-5, norm="layer", tie_embeddings=bool(r.get("tie_word_embeddings", False)), d_ff=F_,
        clip_qkv=float(clip) if clip is not None else None, moe=moe,
    )


# DBRX keeps q/k/v in one Wqkv and each projection of all experts in one [E F, D] matrix.
_DBRX_TEMPLATES: tuple[tuple[str, str], ...] = (
    (r"embed_tokens\.weight", r"transformer.wte.weight"),
    (r"norm\.weight", r"transformer.norm_f.weight"),
    (r"layers\.(\d+)\.input_layernorm\.weight", r"transformer.blocks.\1.norm_attn_norm.norm_1.weight"),
    (r"layers\.(\d+)\.post_attention_layernorm\.weight", r"transformer.blocks.\1.norm_attn_norm.norm_2.weight"),
    (r"layers\.(\d+)\.self_attn\.[qkv]_proj\.weight", r"transformer.blocks.\1.norm_attn_norm.attn.Wqkv.weight"),
    (r"layers\.(\d+)\.self_attn\.o_proj\.weight", r"transformer.blocks.\1.norm_attn_norm.attn.out_proj.weight"),
    (r"layers\.(\d+)\.mlp\.router\.weight", r"transformer.blocks.\1.ffn.router.layer.weight"),
    (r"layers\.(\d+)\.mlp\.experts\.down_proj", r"transformer.blocks.\1.ffn.experts.mlp.w2"),
    (r"lm_head\.weight", r"lm_head.weight"),
)


def dbrx_sources(moelab_key: str) -> list[str]:
    """The DBRX tensors a moelab tensor is made from (``gate_up_proj``: ``w1`` and ``v1``)."""
    m = re.fullmatch(r"layers\.(\d+)\.mlp\.experts\.gate_up_proj", moelab_key)
    if m:
        return [f"transformer.blocks.{m.group(1)}.ffn.experts.mlp.{n}" for n in ("w1", "v1")]
    for pattern, template in _DBRX_TEMPLATES:
        m = re.fullmatch(pattern, moelab_key)
        if m:
            return [m.expand(template)]
    raise KeyError(moelab_key)


def dbrx_from_hf(moelab_key: str, parts: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """One moelab tensor from its DBRX sources (`dbrx_sources`)."""
    E, F_, D = (cfg.moe.num_experts, cfg.moe.d_expert, cfg.d_model) if cfg.moe else (0, 0, cfg.d_model)
    if moelab_key.endswith("experts.gate_up_proj"):  # w1 (gate) and v1 (up): [E F, D] each
        return torch.cat([parts[0].reshape(E, F_, D), parts[1].reshape(E, F_, D)], dim=1)
    if moelab_key.endswith("experts.down_proj"):  # w2 [E F, D], used as `h @ w2`
        return parts[0].reshape(E, F_, D).transpose(1, 2).contiguous()
    m = re.search(r"self_attn\.([qkv])_proj\.weight$", moelab_key)
    if m:
        q, kv = cfg.n_heads * cfg.dim_head, cfg.kv_heads * cfg.dim_head
        start, size = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[m.group(1)]
        return parts[0][start : start + size].contiguous()
    return parts[0]


def dbrx_to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of `dbrx_from_hf` over a whole moelab state dict."""
    out: dict[str, torch.Tensor] = {}
    E, F_, D = cfg.moe.num_experts, cfg.moe.d_expert, cfg.d_model
    for key, t in state.items():
        names = dbrx_sources(key)
        if key.endswith("experts.gate_up_proj"):
            out[names[0]] = t[:, :F_].reshape(E * F_, D).contiguous()
            out[names[1]] = t[:, F_:].reshape(E * F_, D).contiguous()
        elif key.endswith("experts.down_proj"):
            out[names[0]] = t.transpose(1, 2).reshape(E * F_, D).contiguous()
        elif re.search(r"self_attn\.[qkv]_proj\.weight$", key):
            out[names[0]] = torch.cat([out[names[0]], t]) if names[0] in out else t  # q, k, v in order
        else:
            out[names[0]] = t
    return out


def _gpt_oss_config(r: _Reader) -> ModelConfig:
    """gpt-oss: biased q/k/v/o projections, one attention-sink logit per head, sliding and
    full attention by `layer_types`; experts with biases and the clamped GLU, routed by a
    biased router (top-k logits, softmax over the k)."""
    common = _common(r)
    n = common["n_layers"]
    bias = bool(r.get("attention_bias", True))
    types = r.get("layer_types") or ["full_attention"] * n
    window = r.get("sliding_window")
    sliding = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    common.update(
        n_kv_heads=r.int("num_key_value_heads", default=common["n_heads"]), attn_bias=bias, o_bias=bias,
        attn_sinks=True, sliding_window=int(window) if window and sliding else None,
        sliding_layers=sliding if window and sliding else None,
    )
    moe = dict(
        d_model=common["d_model"], d_expert=common["d_ff"], num_experts=r.int("num_local_experts", "num_experts"),
        top_k=r.int("num_experts_per_tok"), router="softmax", norm_topk_prob=True, router_bias=True,
        expert_proj_bias=True, activation="swiglu_oai", swiglu_alpha=float(r.get("swiglu_alpha", 1.702)),
        swiglu_limit=float(r.get("swiglu_limit", 7.0)), aux_loss_coef=0.0,
    )
    return _build(r, common, moe)


# ---------------------------------------------------------------------------------------
# ModelConfig -> HF config.json


def hf_family_for(cfg: ModelConfig) -> str:
    """The HF family that expresses `cfg` exactly, or a `ConfigError` naming the feature."""

    def no(feature: str) -> ConfigError:
        return ConfigError(f"cannot export to Hugging Face format: {feature} has no equivalent in the supported families ({', '.join(EXPORT_FAMILIES)})")

    # Import-only features (DeepSeek, gpt-oss): refused by name, not mistaken for a family.
    for name, value, default in (
        ("attention", cfg.attention, "gqa"), ("attn_sinks", cfg.attn_sinks, False), ("o_bias", cfg.o_bias, False),
        ("sliding_layers", cfg.sliding_layers, None), ("rotary_dim", cfg.rotary_dim, None),
        ("rope_interleave", cfg.rope_interleave, False), ("nope_layers", cfg.nope_layers, ()),
        ("qk_norm", cfg.qk_norm if cfg.qk_norm in ("l2", "head_after_rope") else None, None),
        ("attn_scale", cfg.attn_scale, None),
        ("embedding_multiplier", cfg.embedding_multiplier, 1.0), ("residual_multiplier", cfg.residual_multiplier, 1.0),
        ("logits_scaling", cfg.logits_scaling, 1.0), ("norm", cfg.norm, "rms"),
    ):
        if value != default:
            raise no(f"ModelConfig.{name}={value!r} (export of DeepSeek / gpt-oss models is not implemented)")
    if cfg.moe is not None:
        for name in ("router_bias", "expert_proj_bias", "weight_on_input", "selection_bias"):
            if getattr(cfg.moe, name):
                raise no(f"MoEConfig.{name}=True (export of gpt-oss models is not implemented)")
        if cfg.moe.n_group > 1:
            raise no(f"MoEConfig.n_group={cfg.moe.n_group} (group-limited routing, DeepSeek)")

    if cfg.clip_qkv is not None and cfg.qk_norm != "full":
        raise no(f"clip_qkv={cfg.clip_qkv} without qk_norm='full' (only OLMoE clips q/k/v)")
    if cfg.moe is None:
        if cfg.qk_norm is not None or cfg.attn_bias:
            raise no(f"a dense model with qk_norm={cfg.qk_norm!r} / attn_bias={cfg.attn_bias}")
        return "mistral" if cfg.sliding_window else "llama"
    m = cfg.moe
    if m.router != "softmax":
        raise no(f"MoEConfig.router={m.router!r} (HF MoE families route with softmax top-k)")
    if m.activation != "swiglu":
        raise no(f"MoEConfig.activation={m.activation!r} (HF MoE experts are SwiGLU)")
    if m.routed_scaling_factor != 1.0:
        raise no(f"MoEConfig.routed_scaling_factor={m.routed_scaling_factor}")
    if m.router_dtype != "float32":
        raise no(f"MoEConfig.router_dtype={m.router_dtype!r} (HF routers compute in the model's dtype)")
    if m.num_shared_experts:
        if not m.shared_expert_gate or cfg.qk_norm is not None:
            raise no("shared experts without a sigmoid gate, or with QK-norm (Qwen2-MoE has a gate and no QK-norm)")
        return "qwen2_moe"
    if cfg.attn_bias:
        raise no("attn_bias without shared experts (only Qwen2-MoE has q/k/v biases)")
    every_layer = cfg.moe_layers == list(range(cfg.n_layers))
    if cfg.qk_norm == "full":
        if not every_layer:
            raise no("dense layers in an OLMoE-style (qk_norm='full') model")
        if cfg.sliding_window:
            raise no("a sliding window in an OLMoE-style (qk_norm='full') model")
        return "olmoe"
    if cfg.qk_norm == "head":
        return "qwen3_moe"
    if not every_layer:
        raise no("dense layers in a Mixtral-style model (set qk_norm='head' for Qwen3-MoE)")
    if not m.norm_topk_prob:
        raise no("norm_topk_prob=False in a Mixtral-style model (Mixtral always renormalises the top-k)")
    return "mixtral"


def _rope_scaling_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    sc = cfg.rope_scaling
    if sc is None:
        return {}
    out: dict[str, Any] = {"rope_type": sc.kind, "factor": sc.factor}
    if sc.kind == "llama3":
        out |= {"low_freq_factor": sc.low_freq_factor, "high_freq_factor": sc.high_freq_factor,
                "original_max_position_embeddings": sc.original_max_position_embeddings}
    return out


def config_to_hf(cfg: ModelConfig, *, dtype: str = "float32", extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A transformers ``config.json`` dict for `cfg` (family from `hf_family_for`)."""
    family = hf_family_for(cfg)
    d: dict[str, Any] = {
        "architectures": [ARCHITECTURES[family]],
        "model_type": family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.dim_head,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        # transformers 5 reads rope_parameters, 4.x reads rope_theta: write both.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta} | _rope_scaling_to_hf(cfg),
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
        "use_cache": True,
        "dtype": dtype,
        "torch_dtype": dtype,
    }
    m = cfg.moe
    if family in ("llama", "mistral"):
        d.update(attention_bias=False, mlp_bias=False)
        if family == "mistral":
            d["sliding_window"] = cfg.sliding_window
    elif family == "mixtral":
        assert m is not None
        d.update(
            intermediate_size=m.d_expert,
            num_local_experts=m.num_experts,
            num_experts_per_tok=m.top_k,
            sliding_window=cfg.sliding_window,
            router_aux_loss_coef=m.aux_loss_coef,
        )
    elif family == "olmoe":
        assert m is not None
        d.update(
            intermediate_size=m.d_expert,
            num_experts=m.num_experts,
            num_experts_per_tok=m.top_k,
            norm_topk_prob=m.norm_topk_prob,
            clip_qkv=cfg.clip_qkv,
            attention_bias=False,
            router_aux_loss_coef=m.aux_loss_coef,
        )
    else:  # qwen2_moe, qwen3_moe
        assert m is not None
        dense = [i for i in range(cfg.n_layers) if not cfg.is_moe_layer(i)]
        d.update(
            num_experts=m.num_experts,
            num_local_experts=m.num_experts,
            num_experts_per_tok=m.top_k,
            moe_intermediate_size=m.d_expert,
            norm_topk_prob=m.norm_topk_prob,
            decoder_sparse_step=1,
            mlp_only_layers=dense,
            use_sliding_window=cfg.sliding_window is not None,
            sliding_window=cfg.sliding_window,
            router_aux_loss_coef=m.aux_loss_coef,
        )
        if family == "qwen2_moe":
            kind = "sliding_attention" if cfg.sliding_window else "full_attention"
            d.update(
                qkv_bias=cfg.attn_bias,
                shared_expert_intermediate_size=m.shared_hidden,
                max_window_layers=cfg.n_layers,
                layer_types=[kind] * cfg.n_layers,
            )
        else:
            d["attention_bias"] = False
    d.update(extra or {})
    return d
