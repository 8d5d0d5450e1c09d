"""Hugging Face `config.json` -> `ArchSpec`, one small function per model family.

Each function mirrors what the matching `transformers` (5.x) modeling file
instantiates, so `count_params(spec).total` equals the parameter count of
`AutoModelForCausalLM.from_config(config)` exactly (tests/accounting checks it
family by family on the meta device). Fields that only change FLOPs or memory
(sliding windows) follow the same defaults as the transformers config classes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from moelab.accounting.spec import ArchSpec, AttentionSpec, LayerSpec, MLPSpec, MoESpec
from moelab.errors import ConfigError, DataError


class _Fields:
    """Read fields of one config dict; every error names file, field and families."""

    def __init__(self, cfg: dict[str, Any], source: str, model_type: str) -> None:
        self.cfg, self.source, self.model_type = cfg, source, model_type

    def _error(self, msg: str) -> ConfigError:
        return ConfigError(
            f"{self.source}: {msg} (model_type {self.model_type!r}; supported: "
            f"{', '.join(sorted(FAMILIES))})"
        )

    def req(self, name: str, *aliases: str) -> Any:
        """A required int field; `aliases` are older or newer spellings of it."""
        for key in (name, *aliases):
            if self.cfg.get(key) is not None:
                return self.int(key)
        raise self._error(f"field {name!r} is missing, expected an int")

    def get(self, name: str, default: Any = None) -> Any:
        value = self.cfg.get(name)
        return default if value is None else value

    def int(self, name: str, default: int | None = None) -> int:
        value = self.get(name, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise self._error(f"field {name!r} must be an int >= 0, got {value!r}")
        return value

    def sub(self, name: str) -> _Fields:
        value = self.cfg.get(name)
        if not isinstance(value, dict):
            raise self._error(f"field {name!r} is missing or not an object")
        return _Fields(value, f"{self.source}[{name}]", self.model_type)


def _gqa(f: _Fields, *, qkv_bias: bool = False, o_bias: bool = False, **kw: Any) -> AttentionSpec:
    """GQA attention; head_dim defaults to hidden_size // num_attention_heads and
    num_key_value_heads to num_attention_heads, as in every transformers config."""
    heads = f.req("num_attention_heads")
    return AttentionSpec(
        n_heads=heads,
        n_kv_heads=f.int("num_key_value_heads", heads),
        head_dim=f.int("head_dim", f.req("hidden_size") // max(heads, 1)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        **kw,
    )


def _windows(f: _Fields, n_layers: int, *, qwen: bool = False) -> list[int | None]:
    """Per-layer attention span: `layer_types` when present, else the family default
    (Qwen: sliding only with use_sliding_window, from layer max_window_layers on;
    Mistral/Mixtral/PhiMoE: `sliding_window` on every layer)."""
    window = f.get("sliding_window")
    if qwen and not f.get("use_sliding_window", False):
        window = None
    types = f.get("layer_types")
    if types is not None:
        return [window if t == "sliding_attention" else None for t in types]
    if qwen:
        first = f.int("max_window_layers", 28)
        return [window if i >= first else None for i in range(n_layers)]
    return [window] * n_layers


def _uniform(f: _Fields, attn: AttentionSpec, ffn: MLPSpec | MoESpec, **kw: Any) -> ArchSpec:
    n = f.req("num_hidden_layers")
    windows = kw.pop("windows", None) or [attn.window] * n
    layers = tuple(
        LayerSpec(attention=_with_window(attn, w), ffn=ffn) for w in windows[:n]
    )
    return _arch(f, layers, **kw)


def _with_window(attn: AttentionSpec, window: int | None) -> AttentionSpec:
    return attn if window == attn.window else replace(attn, window=window)


def _arch(f: _Fields, layers: tuple[LayerSpec, ...], **kw: Any) -> ArchSpec:
    return ArchSpec(
        name=kw.pop("name", f.get("_name_or_path") or f.model_type),
        vocab_size=f.req("vocab_size"),
        d_model=f.req("hidden_size"),
        layers=layers,
        tie_embeddings=bool(f.get("tie_word_embeddings", False)),
        **kw,
    )


def _llama(f: _Fields) -> ArchSpec:
    bias = bool(f.get("attention_bias", False))
    mlp = MLPSpec(d_ff=f.req("intermediate_size"), bias=bool(f.get("mlp_bias", False)))
    return _uniform(f, _gqa(f, qkv_bias=bias, o_bias=bias), mlp)


def _mistral(f: _Fields) -> ArchSpec:
    n = f.req("num_hidden_layers")
    return _uniform(f, _gqa(f), MLPSpec(d_ff=f.req("intermediate_size")), windows=_windows(f, n))


def _qwen2(f: _Fields) -> ArchSpec:
    n = f.req("num_hidden_layers")
    mlp = MLPSpec(d_ff=f.req("intermediate_size"))
    return _uniform(f, _gqa(f, qkv_bias=True), mlp, windows=_windows(f, n, qwen=True))


def _qwen3(f: _Fields) -> ArchSpec:
    n, bias = f.req("num_hidden_layers"), bool(f.get("attention_bias", False))
    attn = _gqa(f, qkv_bias=bias, o_bias=bias, qk_norm="head")
    mlp = MLPSpec(d_ff=f.req("intermediate_size"))
    return _uniform(f, attn, mlp, windows=_windows(f, n, qwen=True))


def _mixtral_like(f: _Fields, *, bias: bool = False, **kw: Any) -> ArchSpec:
    n = f.req("num_hidden_layers")
    moe = MoESpec(
        num_experts=f.req("num_local_experts", "num_experts"),
        top_k=f.req("num_experts_per_tok"),
        expert=MLPSpec(d_ff=f.req("intermediate_size")),
    )
    return _uniform(f, _gqa(f, qkv_bias=bias, o_bias=bias), moe, windows=_windows(f, n), **kw)


def _mixtral(f: _Fields) -> ArchSpec:
    return _mixtral_like(f)


def _phimoe(f: _Fields) -> ArchSpec:
    """PhiMoE: Mixtral with LayerNorm (weight + bias) and optional biases."""
    return _mixtral_like(
        f,
        bias=bool(f.get("attention_bias", False)),
        norm="layernorm",
        lm_head_bias=bool(f.get("lm_head_bias", False)),
    )


def _granitemoe(f: _Fields) -> ArchSpec:
    bias = bool(f.get("attention_bias", False))
    moe = MoESpec(
        num_experts=f.req("num_local_experts", "num_experts"),
        top_k=f.req("num_experts_per_tok"),
        expert=MLPSpec(d_ff=f.req("intermediate_size")),
    )
    return _uniform(f, _gqa(f, qkv_bias=bias, o_bias=bias), moe)


def _olmoe(f: _Fields) -> ArchSpec:
    bias = bool(f.get("attention_bias", False))
    moe = MoESpec(
        num_experts=f.req("num_experts", "num_local_experts"),
        top_k=f.req("num_experts_per_tok"),
        expert=MLPSpec(d_ff=f.req("intermediate_size")),
    )
    return _uniform(f, _gqa(f, qkv_bias=bias, o_bias=bias, qk_norm="full"), moe)


def _qwen_moe(f: _Fields, *, qwen3: bool) -> ArchSpec:
    """Qwen2-MoE / Qwen3-MoE: layer i is MoE unless listed in `mlp_only_layers` or
    (i + 1) is not a multiple of `decoder_sparse_step`; Qwen2-MoE adds a gated
    shared expert, Qwen3-MoE has none but normalises q and k per head."""
    n = f.req("num_hidden_layers")
    # Qwen3-MoE checkpoints say num_experts; transformers 5 writes num_local_experts.
    num_experts = f.int("num_experts", f.int("num_local_experts", 0))
    step, dense_only = f.int("decoder_sparse_step", 1), set(f.get("mlp_only_layers", []))
    if qwen3:
        bias = bool(f.get("attention_bias", False))
        attn = _gqa(f, qkv_bias=bias, o_bias=bias, qk_norm="head")
        window = f.get("sliding_window") if f.get("use_sliding_window", False) else None
        windows: list[int | None] = [window] * n
        shared = None
    else:
        attn = _gqa(f, qkv_bias=bool(f.get("qkv_bias", True)))
        windows = _windows(f, n, qwen=True)
        shared = MLPSpec(d_ff=f.req("shared_expert_intermediate_size"))
    moe = None
    if num_experts > 0:
        moe = MoESpec(
            num_experts=num_experts,
            top_k=f.req("num_experts_per_tok"),
            expert=MLPSpec(d_ff=f.req("moe_intermediate_size")),
            shared=shared,
            num_shared=1 if shared else 0,
            shared_gate=shared is not None,
        )
    dense = MLPSpec(d_ff=f.req("intermediate_size"))
    layers = tuple(
        LayerSpec(
            attention=_with_window(attn, windows[i]),
            ffn=moe if moe and i not in dense_only and (i + 1) % step == 0 else dense,
        )
        for i in range(n)
    )
    return _arch(f, layers)


def _deepseek(f: _Fields) -> ArchSpec:
    """DeepSeek-V2/V3: MLA attention everywhere; the first `first_k_dense_replace`
    layers are dense, the rest MoE with `n_shared_experts` always-on experts.
    Multi-token-prediction modules (`num_nextn_predict_layers`) are not counted:
    they are not part of the inference model and transformers does not build them."""
    n = f.req("num_hidden_layers")
    q_rank = f.get("q_lora_rank")
    attn = AttentionSpec(
        kind="mla",
        n_heads=f.req("num_attention_heads"),
        q_lora_rank=f.int("q_lora_rank") if q_rank is not None else None,
        kv_lora_rank=f.req("kv_lora_rank"),
        qk_nope_head_dim=f.req("qk_nope_head_dim"),
        qk_rope_head_dim=f.req("qk_rope_head_dim"),
        v_head_dim=f.req("v_head_dim"),
        qkv_bias=bool(f.get("attention_bias", False)),
        o_bias=bool(f.get("attention_bias", False)),
    )
    mlp_bias = bool(f.get("mlp_bias", False)) if f.model_type == "deepseek_v2" else False
    d_expert, n_shared = f.req("moe_intermediate_size"), f.int("n_shared_experts", 0)
    moe = MoESpec(
        num_experts=f.req("n_routed_experts", "num_local_experts"),
        top_k=f.req("num_experts_per_tok"),
        expert=MLPSpec(d_ff=d_expert),
        shared=MLPSpec(d_ff=d_expert * n_shared, bias=mlp_bias),
        num_shared=n_shared,
    )
    dense = MLPSpec(d_ff=f.req("intermediate_size"), bias=mlp_bias)
    first_dense = f.int("first_k_dense_replace", 0)
    layers = tuple(
        LayerSpec(attention=attn, ffn=moe if i >= first_dense else dense) for i in range(n)
    )
    notes = ()
    if f.get("num_nextn_predict_layers"):
        notes = ("multi-token-prediction modules not counted (not used for inference)",)
    return _arch(f, layers, notes=notes)


def _dbrx(f: _Fields) -> ArchSpec:
    """DBRX: nested attn_config/ffn_config, fused Wqkv (same count as q, k, v),
    LayerNorm without bias, GLU experts (w1, v1, w2)."""
    attn_cfg, ffn_cfg = f.sub("attn_config"), f.sub("ffn_config")
    d, heads = f.req("d_model"), f.req("n_heads")
    attn = AttentionSpec(n_heads=heads, n_kv_heads=attn_cfg.int("kv_n_heads", 1), head_dim=d // heads)
    moe = MoESpec(
        num_experts=ffn_cfg.int("moe_num_experts", 4),
        top_k=ffn_cfg.int("moe_top_k", 1),
        expert=MLPSpec(d_ff=ffn_cfg.int("ffn_hidden_size", 3584)),
    )
    layers = tuple(LayerSpec(attention=attn, ffn=moe) for _ in range(f.req("n_layers")))
    return ArchSpec(
        name=f.get("_name_or_path") or "dbrx",
        vocab_size=f.req("vocab_size"),
        d_model=d,
        layers=layers,
        norm="layernorm_nobias",
        tie_embeddings=bool(f.get("tie_word_embeddings", False)),
    )


def _gpt_oss(f: _Fields) -> ArchSpec:
    """gpt-oss: biased attention with per-head sinks, biased experts and router;
    layer_types alternate sliding (128) and full attention by default."""
    n = f.req("num_hidden_layers")
    bias = bool(f.get("attention_bias", True))
    attn = _gqa(f, qkv_bias=bias, o_bias=bias, sinks=True)
    moe = MoESpec(
        num_experts=f.req("num_local_experts", "num_experts"),
        top_k=f.req("num_experts_per_tok"),
        expert=MLPSpec(d_ff=f.req("intermediate_size"), bias=True),
        router_bias=True,
    )
    windows = _windows(f, n)
    if f.get("layer_types") is None:
        windows = [f.get("sliding_window") if (i + 1) % 2 else None for i in range(n)]
    return _uniform(f, attn, moe, windows=windows)


def _llama4(f: _Fields) -> ArchSpec:
    """Llama 4 text model: MoE layers (top-k routed + one shared expert of the same
    width) at `moe_layers`, default every `interleave_moe_layer_step`-th layer;
    other layers are dense with `intermediate_size_mlp`. RoPE layers use chunked
    attention (span `attention_chunk_size`); every `no_rope_layer_interval`-th
    layer is global NoPE attention. The QK L2 norm has no parameters."""
    if isinstance(f.cfg.get("text_config"), dict):
        text = _Fields(f.cfg["text_config"], f"{f.source}[text_config]", "llama4_text")
        spec = _llama4(text)
        return replace(spec, notes=(*spec.notes, "text model only: vision encoder not counted"))
    n, bias = f.req("num_hidden_layers"), bool(f.get("attention_bias", False))
    step = f.int("interleave_moe_layer_step", 1)
    moe_layers = f.get("moe_layers")
    if moe_layers is None:
        moe_layers = list(range(step - 1, n, step))
    d_expert = f.req("intermediate_size")
    moe = MoESpec(
        num_experts=f.req("num_local_experts", "num_experts"),
        top_k=f.req("num_experts_per_tok"),
        expert=MLPSpec(d_ff=d_expert),
        shared=MLPSpec(d_ff=d_expert),
        num_shared=1,
    )
    dense = MLPSpec(d_ff=f.req("intermediate_size_mlp"))
    chunk = f.get("attention_chunk_size")
    types = f.get("layer_types")
    if types is None:
        interval = f.int("no_rope_layer_interval", 4)
        rope = f.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(n)]
        types = ["chunked_attention" if r and chunk else "full_attention" for r in rope]
    attn = _gqa(f, qkv_bias=bias, o_bias=bias)
    layers = tuple(
        LayerSpec(
            attention=_with_window(attn, chunk if types[i] == "chunked_attention" else None),
            ffn=moe if i in moe_layers else dense,
        )
        for i in range(n)
    )
    return _arch(f, layers)


FAMILIES: dict[str, Callable[[_Fields], ArchSpec]] = {
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "mixtral": _mixtral,
    "phimoe": _phimoe,
    "granitemoe": _granitemoe,
    "olmoe": _olmoe,
    "qwen2_moe": lambda f: _qwen_moe(f, qwen3=False),
    "qwen3_moe": lambda f: _qwen_moe(f, qwen3=True),
    "deepseek_v2": _deepseek,
    "deepseek_v3": _deepseek,
    "dbrx": _dbrx,
    "gpt_oss": _gpt_oss,
    "llama4": _llama4,
    "llama4_text": _llama4,
}


def spec_from_hf_config(cfg: dict[str, Any], *, source: str = "config.json") -> ArchSpec:
    """Convert a parsed Hugging Face config dict into an `ArchSpec`.

    Raises ConfigError naming `source`, the field and the supported families when
    the model_type is unknown or a field is missing or has the wrong type.
    """
    model_type = cfg.get("model_type")
    if model_type not in FAMILIES:
        raise ConfigError(
            f"{source}: model_type {model_type!r} is not supported; supported: "
            f"{', '.join(sorted(FAMILIES))}"
        )
    try:
        return FAMILIES[model_type](_Fields(cfg, source, model_type))
    except ConfigError as e:
        if str(e).startswith(source):
            raise
        # A shape the spec rejects (e.g. top_k > num_experts): say which file.
        raise ConfigError(f"{source}: {e}") from e
    except (TypeError, KeyError, IndexError) as e:
        raise ConfigError(f"{source}: malformed {model_type} config ({e})") from e


def load_hf_config(path: str | Path) -> tuple[dict[str, Any], str]:
    """Read `config.json` (a file, or a model folder holding one).

    Returns the parsed dict and the path as a string for messages.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise DataError(f"{path}: no such config file (expected a config.json or a folder with one)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a UTF-8 text file ({e.reason})") from e
    if not isinstance(cfg, dict):
        raise DataError(f"{path}: expected a JSON object at the top level, got {type(cfg).__name__}")
    return cfg, str(path)
