"""Hugging Face `config.json` -> `ArchSpec`, one small function per model family.

A config.json is first completed the way transformers completes it (`library_config`):
through the family's own config class when transformers is importable, else from
`hf_defaults.CLASS_DEFAULTS` (torch-free; the readers then apply the classes'
`__post_init__` derivations themselves). Malformed values are refused before either,
with one line naming the config.json field. docs/size.md records the decision.

Each function mirrors what the matching `transformers` (5.x) modeling file
instantiates, so `count_params(spec).total` equals the parameter count of
`AutoModelForCausalLM.from_config(config)` exactly (tests/accounting checks it
family by family on the meta device). Fields that only change FLOPs or memory
(sliding windows) follow the same defaults as the transformers config classes.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from moelab.accounting.hf_defaults import CLASS_DEFAULTS
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

    def req(self, name: str, *aliases: str) -> int:
        """A required int field, >= 1; `aliases` are older or newer spellings of it."""
        for key in (name, *aliases):
            if self.cfg.get(key) is not None:
                value = self.int(key)
                if value < 1:
                    raise self._error(f"field {key!r} must be an int >= 1, got {value!r}")
                return value
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
        if value is None:
            value = {}  # the nested config class's defaults (DBRX attn_config / ffn_config)
        if not isinstance(value, dict):
            raise self._error(f"field {name!r} is missing or not an object")
        return _Fields(value, f"{self.source}[{name}]", self.model_type)


def _gqa(f: _Fields, *, qkv_bias: bool = False, o_bias: bool = False, **kw: Any) -> AttentionSpec:
    """GQA attention; head_dim defaults to hidden_size // num_attention_heads and
    num_key_value_heads to num_attention_heads, as in every transformers config."""
    heads = f.req("num_attention_heads")
    kv_heads = f.int("num_key_value_heads", heads)
    if kv_heads < 1 or heads % kv_heads:
        raise f._error(
            f"field 'num_attention_heads' ({heads}) must be a multiple of 'num_key_value_heads' ({kv_heads})"
        )
    return AttentionSpec(
        n_heads=heads,
        n_kv_heads=kv_heads,
        head_dim=f.int("head_dim", f.req("hidden_size") // max(heads, 1)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        **kw,
    )


def _windows(f: _Fields, n_layers: int, *, qwen: bool = False) -> list[int | None]:
    """Per-layer attention span: `layer_types` when present, else the family default,
    as the config classes' `__post_init__` derive it (transformers 5.24):
    Qwen2 / Qwen3 (dense): sliding only with use_sliding_window, on layers
    i >= max_window_layers; Qwen2-MoE: with use_sliding_window, on the even-indexed
    layers i < max_window_layers; Mistral/Mixtral/PhiMoE: `sliding_window` on every layer."""
    window = f.get("sliding_window") or None  # Qwen2-MoE stores 0 for "no window"
    if qwen and not f.get("use_sliding_window", False):
        window = None
    types = f.get("layer_types")
    if types is not None:
        return [window if t == "sliding_attention" else None for t in types]
    if qwen:
        first = f.int("max_window_layers", 28)
        if f.model_type == "qwen2_moe":
            return [window if (i + 1) % 2 and i < first else None for i in range(n_layers)]
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


def _moe(f: _Fields, experts: tuple[str, ...], expert: MLPSpec, **kw: Any) -> MoESpec:
    """A MoESpec whose size errors name the config.json fields (first of `experts`)."""
    num_experts, top_k = f.req(*experts), f.req("num_experts_per_tok")
    if top_k > num_experts:
        key = next(k for k in experts if f.cfg.get(k) is not None)
        raise f._error(f"field 'num_experts_per_tok' ({top_k}) exceeds {key!r} ({num_experts})")
    return MoESpec(num_experts=num_experts, top_k=top_k, expert=expert, **kw)


def _mixtral_like(f: _Fields, *, bias: bool = False, **kw: Any) -> ArchSpec:
    n = f.req("num_hidden_layers")
    moe = _moe(f, ("num_local_experts", "num_experts"), MLPSpec(d_ff=f.req("intermediate_size")))
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
    """GraniteMoE: Mixtral-shaped, `attention_bias` on q/k/v/o; the -shared variant adds
    one gated MLP of `shared_intermediate_size` (0: none)."""
    bias = bool(f.get("attention_bias", False))
    shared = f.int("shared_intermediate_size", 0) if f.model_type == "granitemoeshared" else 0
    moe = _moe(f, ("num_local_experts", "num_experts"), MLPSpec(d_ff=f.req("intermediate_size")),
               shared=MLPSpec(d_ff=shared) if shared else None, num_shared=1 if shared else 0)
    return _uniform(f, _gqa(f, qkv_bias=bias, o_bias=bias), moe)


def _olmoe(f: _Fields) -> ArchSpec:
    bias = bool(f.get("attention_bias", False))
    moe = _moe(f, ("num_experts", "num_local_experts"), MLPSpec(d_ff=f.req("intermediate_size")))
    return _uniform(f, _gqa(f, qkv_bias=bias, o_bias=bias, qk_norm="full"), moe)


def _qwen_moe(f: _Fields, *, qwen3: bool) -> ArchSpec:
    """Qwen2-MoE / Qwen3-MoE: layer i is MoE unless listed in `mlp_only_layers` or
    (i + 1) is not a multiple of `decoder_sparse_step`; Qwen2-MoE adds a gated
    shared expert, Qwen3-MoE has none but normalises q and k per head."""
    n = f.req("num_hidden_layers")
    # Qwen3-MoE checkpoints say num_experts; transformers 5 writes num_local_experts.
    num_experts = f.int("num_experts", f.int("num_local_experts", 0))
    step, dense_only = f.req("decoder_sparse_step"), set(f.get("mlp_only_layers", []))
    if qwen3:
        bias = bool(f.get("attention_bias", False))
        attn = _gqa(f, qkv_bias=bias, o_bias=bias, qk_norm="head")
        window = f.get("sliding_window") if f.get("use_sliding_window", False) else None
        windows: list[int | None] = _windows(f, n) if f.get("layer_types") else [window] * n
        shared = None
    else:
        attn = _gqa(f, qkv_bias=bool(f.get("qkv_bias", True)))
        windows = _windows(f, n, qwen=True)
        shared = MLPSpec(d_ff=f.req("shared_expert_intermediate_size"))
    moe = None
    if num_experts > 0:  # transformers builds every layer dense when num_experts is 0
        moe = _moe(
            f,
            ("num_experts", "num_local_experts"),
            MLPSpec(d_ff=f.req("moe_intermediate_size")),
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
    q_rank = f.get("q_lora_rank")  # null in config.json: no query bottleneck (V2-Lite)
    attn = AttentionSpec(
        kind="mla",
        n_heads=f.req("num_attention_heads"),
        q_lora_rank=f.req("q_lora_rank") if q_rank is not None else None,
        kv_lora_rank=f.req("kv_lora_rank"),
        qk_nope_head_dim=f.int("qk_nope_head_dim"),
        qk_rope_head_dim=f.req("qk_rope_head_dim"),
        v_head_dim=f.req("v_head_dim"),
        qkv_bias=bool(f.get("attention_bias", False)),
        o_bias=bool(f.get("attention_bias", False)),
    )
    mlp_bias = bool(f.get("mlp_bias", False)) if f.model_type == "deepseek_v2" else False
    d_expert, n_shared = f.req("moe_intermediate_size"), f.int("n_shared_experts", 0)
    moe = _moe(
        f,
        ("n_routed_experts", "num_local_experts", "num_experts"),
        MLPSpec(d_ff=d_expert),
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


def _v3_style(f: _Fields, attn: AttentionSpec, windows: list[int | None] | None = None) -> ArchSpec:
    """GQA attention + DeepSeek-V3's MoE (GLM-4.5, dots1): the first
    `first_k_dense_replace` layers dense (`intermediate_size`), then `n_routed_experts`
    experts of `moe_intermediate_size` plus `n_shared_experts` of the same width as one MLP.
    The `e_score_correction_bias` is a buffer; MTP layers (`num_nextn_predict_layers`) are
    not built by transformers and not counted."""
    n = f.req("num_hidden_layers")
    d_expert, n_shared = f.req("moe_intermediate_size"), f.int("n_shared_experts", 0)
    moe = _moe(f, ("n_routed_experts", "num_local_experts"), MLPSpec(d_ff=d_expert),
               shared=MLPSpec(d_ff=d_expert * n_shared) if n_shared else None, num_shared=n_shared)
    dense, first = MLPSpec(d_ff=f.req("intermediate_size")), f.int("first_k_dense_replace", 0)
    windows = windows or [None] * n
    layers = tuple(
        LayerSpec(attention=_with_window(attn, windows[i]), ffn=moe if i >= first else dense) for i in range(n)
    )
    notes = ()
    if f.get("num_nextn_predict_layers"):
        notes = ("multi-token-prediction modules not counted (not used for inference)",)
    return _arch(f, layers, notes=notes)


def _glm4_moe(f: _Fields) -> ArchSpec:
    """GLM-4.5 / 4.6: q/k/v biases (`attention_bias`, none on o), optional per-head QK-norm."""
    bias = bool(f.get("attention_bias", False))
    return _v3_style(f, _gqa(f, qkv_bias=bias, qk_norm="head" if f.get("use_qk_norm") else "none"))


def _dots1(f: _Fields) -> ArchSpec:
    """dots.llm1: q/k/v/o biases (`attention_bias`), per-head QK-norm, `layer_types` windows."""
    bias = bool(f.get("attention_bias", False))
    n, window = f.req("num_hidden_layers"), f.get("sliding_window")
    if f.get("layer_types") is not None:
        windows = _windows(f, n)
    else:  # Dots1Config.__post_init__: sliding from layer max_window_layers on
        first = f.int("max_window_layers", n)
        windows = [window if window is not None and i >= first else None for i in range(n)]
    return _v3_style(f, _gqa(f, qkv_bias=bias, o_bias=bias, qk_norm="head"), windows)


def _dbrx(f: _Fields) -> ArchSpec:
    """DBRX: nested attn_config/ffn_config, fused Wqkv (same count as q, k, v),
    LayerNorm without bias, GLU experts (w1, v1, w2)."""
    attn_cfg, ffn_cfg = f.sub("attn_config"), f.sub("ffn_config")
    d, heads = f.req("d_model"), f.req("n_heads")
    attn = AttentionSpec(n_heads=heads, n_kv_heads=attn_cfg.int("kv_n_heads", 1), head_dim=d // heads)
    num_experts, top_k = ffn_cfg.int("moe_num_experts", 4), ffn_cfg.int("moe_top_k", 1)
    if not 1 <= top_k <= num_experts:
        raise ffn_cfg._error(f"field 'moe_top_k' ({top_k}) must be in [1, moe_num_experts={num_experts}]")
    moe = MoESpec(num_experts=num_experts, top_k=top_k, expert=MLPSpec(d_ff=ffn_cfg.int("ffn_hidden_size", 3584)))
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
    moe = _moe(
        f, ("num_local_experts", "num_experts"), MLPSpec(d_ff=f.req("intermediate_size"), bias=True), router_bias=True
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
    moe = _moe(
        f, ("num_local_experts", "num_experts"), MLPSpec(d_ff=d_expert), shared=MLPSpec(d_ff=d_expert), num_shared=1
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
    "granitemoeshared": _granitemoe,
    "glm4_moe": _glm4_moe,
    "dots1": _dots1,
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


# Families whose config.json names another family's class (same architecture and keys).
ALIASES = {"kimi_k2": "deepseek_v3"}

# The layer_types values each family's modeling code knows.
_LAYER_TYPES = {"full_attention", "sliding_attention", "chunked_attention"}


def transformers_available() -> bool:
    """Whether transformers is importable (without importing it: that imports torch)."""
    return importlib.util.find_spec("transformers") is not None


def check_config_fields(cfg: dict[str, Any], source: str, model_type: str) -> None:
    """Refuse values that transformers would accept or misread, one line naming the field.

    - ``decoder_sparse_step`` must be an int >= 1 (0 is a ZeroDivisionError in the
      modeling code, which computes ``(i + 1) % step``);
    - ``layer_types`` must be a list of known strings, one per layer (a string would be
      read character by character, a short list leaves layers without a type);
    - ``mlp_only_layers`` / ``moe_layers`` / ``no_rope_layers`` must be lists of ints
      (``"0,1"`` is a string: ``i in "0,1"`` is a TypeError or a wrong answer).
    """

    def fail(msg: str) -> ConfigError:
        return ConfigError(f"{source}: {msg} (model_type {model_type!r})")

    def check(d: dict[str, Any], where: str) -> None:
        step = d.get("decoder_sparse_step")
        if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 1):
            raise fail(f"field {where}'decoder_sparse_step' must be an int >= 1, got {step!r}")
        n = d.get("num_hidden_layers")
        types = d.get("layer_types")
        if types is not None:
            if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
                raise fail(f"field {where}'layer_types' must be a list of strings, got {types!r}")
            if isinstance(n, int) and len(types) != n:
                raise fail(
                    f"field {where}'layer_types' has {len(types)} entries, expected one per layer "
                    f"(num_hidden_layers={n})"
                )
            unknown = sorted(set(types) - _LAYER_TYPES)
            if unknown:
                raise fail(f"field {where}'layer_types' has unknown value(s) {unknown}; known: {sorted(_LAYER_TYPES)}")
        for name in ("mlp_only_layers", "moe_layers", "no_rope_layers"):
            value = d.get(name)
            if value is None:
                continue
            if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
                raise fail(f"field {where}{name!r} must be a list of layer indices (ints), got {value!r}")
            if name != "no_rope_layers" and isinstance(n, int) and any(not 0 <= i < n for i in value):
                raise fail(f"field {where}{name!r} has an index outside [0, num_hidden_layers={n}): {value!r}")

    check(cfg, "")
    if isinstance(cfg.get("text_config"), dict):
        check(cfg["text_config"], "text_config.")


def library_config(cfg: dict[str, Any], *, source: str = "config.json",
                   use_transformers: bool | None = None) -> tuple[dict[str, Any], str]:
    """`cfg` completed as transformers completes it, and a note saying how it was read.

    ``use_transformers`` None (default): through transformers when it is importable. Then
    ``AutoConfig.for_model(model_type, **cfg).to_dict()``: the class's defaults for missing
    keys and its derived fields. Otherwise (or with False) missing keys are filled from
    `CLASS_DEFAULTS` and the readers derive the rest by the same rules.
    """
    model_type = cfg.get("model_type")
    lib_type = ALIASES.get(model_type, model_type)
    if use_transformers is None:
        use_transformers = transformers_available()
    if not use_transformers:
        filled = {**CLASS_DEFAULTS.get(lib_type, {}), **cfg}
        if lib_type == "llama4" and isinstance(cfg.get("text_config"), dict):
            filled["text_config"] = {**CLASS_DEFAULTS["llama4_text"], **cfg["text_config"]}
        return filled, "missing keys filled from moelab's copy of the transformers 5.24 class defaults"
    import transformers  # imports torch: only here, for a config.json

    kwargs = {k: v for k, v in cfg.items() if k != "model_type"}
    try:
        lib = transformers.AutoConfig.for_model(lib_type, **kwargs)
    except Exception as e:  # a config class's own validation: one line, its words
        msg = " ".join(str(e).split())
        raise ConfigError(f"{source}: transformers rejects this {lib_type} config: {msg}") from e
    filled = lib.to_dict()
    filled["model_type"] = model_type
    return filled, f"read through transformers {transformers.__version__} {type(lib).__name__}"


def spec_from_hf_config(cfg: dict[str, Any], *, source: str = "config.json",
                        use_transformers: bool | None = None, complete: bool = False) -> ArchSpec:
    """Convert a parsed Hugging Face config dict into an `ArchSpec`.

    The dict is first checked (`check_config_fields`) and completed (`library_config`;
    ``use_transformers`` chooses the path), unless ``complete`` (moelab's own presets,
    written out in full: read as they are, torch-free). Raises ConfigError naming `source`, the
    config.json field and the supported families when the model_type is unknown or a
    field is missing or has the wrong type.
    """
    model_type = cfg.get("model_type")
    if model_type not in FAMILIES and model_type not in ALIASES:
        raise ConfigError(
            f"{source}: model_type {model_type!r} is not supported; supported: "
            f"{', '.join(sorted([*FAMILIES, *ALIASES]))}"
        )
    check_config_fields(cfg, source, model_type)
    filled, how = (cfg, "") if complete else library_config(cfg, source=source, use_transformers=use_transformers)
    family = ALIASES.get(model_type, model_type)
    try:
        spec = FAMILIES[family](_Fields(filled, source, model_type))
    except ConfigError as e:
        if str(e).startswith(source):
            raise
        # A shape the spec rejects that no reader check caught: say which file.
        raise ConfigError(f"{source}: {e}") from e
    except (TypeError, KeyError, IndexError) as e:
        raise ConfigError(f"{source}: malformed {model_type} config ({e})") from e
    return replace(spec, notes=(*spec.notes, f"config.json {how}")) if how else spec


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
