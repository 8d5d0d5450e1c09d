"""The generic sizing path: any MoE family transformers knows, counted on its own model.

For a `model_type` without an exact reader in `hf_config`, transformers builds the
model on the ``meta`` device (no memory, no weights) and every parameter is classified
by where it sits in the module tree:

- input embedding / LM head: the modules `get_input_embeddings()` / `get_output_embeddings()`
  return (a tied head is one matrix, counted once);
- routed experts: under a module named ``experts`` (stacked ``[E, ...]`` tensors or
  ``experts.N`` lists); shared experts: ``shared_expert(s)`` / ``shared_mlp``;
- router: a ``gate`` / ``router`` module's own weight and bias;
- norms: 1-D parameters of modules whose name contains ``norm``; attention: under
  ``attn`` / ``attention``; the rest (dense FFNs, Mamba / linear-attention mixers): other.

Active parameters are everything but the routed experts, plus K / E of them, with E and
K read from the config (`num_local_experts` / `num_experts` / `n_routed_experts` /
`moe_num_experts`, and `num_experts_per_tok` / `moe_top_k` / ...): the convention of the
exact path, assuming every MoE layer has the same E and K. The result is an
`ExplicitSpec`; its notes say that this path counted it. This module imports torch and
transformers, lazily: only a config.json of such a family gets here.
"""

from __future__ import annotations

import re
from typing import Any

from moelab.accounting.hf_config import FAMILIES
from moelab.accounting.spec import AttentionSpec, ExplicitSpec
from moelab.errors import ConfigError

EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts")
TOP_K_KEYS = ("num_experts_per_tok", "moe_top_k", "moe_topk", "top_k_experts", "top_k", "num_selected_experts")

_ROUTED = re.compile(r"(^|\.)experts(\.|$)")
_SHARED = re.compile(r"shared_experts?(\.|$)|shared_mlp(\.|$)")
_ROUTER = re.compile(r"(^|\.)(gate|router)(\.layer)?\.(weight|bias)$")
_ATTENTION = re.compile(r"(^|\.)(self_attn|attn|attention|self_attention)\.")


def _first(config: Any, keys: tuple[str, ...]) -> tuple[str, int] | None:
    """The first of `keys` the config holds as a positive int (attribute aliases included;
    a per-layer list of one value, as Hunyuan writes its top-k, counts as that value)."""
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, list) and value and all(v == value[0] for v in value):
            value = value[0]
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return key, value
    return None


def classify(name: str, ndim: int) -> str:
    """The component of one parameter, from its dotted name (see the module docstring)."""
    if _SHARED.search(name):
        return "shared_experts"
    if _ROUTED.search(name):
        return "routed_experts"
    if _ROUTER.search(name):
        return "router"
    if ndim == 1 and "norm" in name.rsplit(".", 2)[-2 if "." in name else 0].lower():
        return "norms"
    if _ATTENTION.search(name):
        return "attention"
    return "other"


def spec_from_meta_model(cfg: dict[str, Any], *, source: str = "config.json") -> ExplicitSpec:
    """Size an MoE config.json of any family transformers knows (see the module docstring).

    Raises ConfigError naming the file when transformers is missing, the family is not a
    causal LM or has no expert count / top-k in its config.
    """
    import importlib.util

    model_type = cfg.get("model_type")
    if importlib.util.find_spec("transformers") is None:
        raise ConfigError(f"{source}: model_type {model_type!r} has no exact reader and the generic path needs "
                          "transformers (pip install transformers)")
    import torch
    import transformers

    if model_type not in transformers.CONFIG_MAPPING:
        raise ConfigError(f"{source}: model_type {model_type!r} is not supported: neither an exact reader "
                          f"({', '.join(sorted(FAMILIES))}) nor a family transformers {transformers.__version__} knows")
    kwargs = {k: v for k, v in cfg.items() if k != "model_type"}
    try:
        lib = transformers.AutoConfig.for_model(model_type, **kwargs)
    except Exception as e:
        raise ConfigError(f"{source}: transformers rejects this {model_type} config: {' '.join(str(e).split())}") from e
    text = lib.get_text_config() if hasattr(lib, "get_text_config") else lib
    d = text.to_dict()
    experts, top_k = _first(text, EXPERT_KEYS), _first(text, TOP_K_KEYS)
    if experts is None or top_k is None:
        raise ConfigError(f"{source}: model_type {model_type!r} is not supported: its config has no expert count "
                          f"({' / '.join(EXPERT_KEYS)}) or top-k ({' / '.join(TOP_K_KEYS)}), so it is not an MoE "
                          "model the generic path can size")
    E, K = experts[1], top_k[1]
    try:
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(lib)
    except Exception as e:
        raise ConfigError(f"{source}: transformers cannot build a causal LM for {model_type!r}: "
                          f"{' '.join(str(e).split())[:300]}") from e
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    emb_ids = {id(p) for p in emb.parameters()} if emb is not None else set()
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    parts = dict.fromkeys(("embedding", "lm_head", "routed_experts", "shared_experts", "router", "norms",
                           "attention", "other"), 0)
    for name, p in model.named_parameters():  # unique parameters: a tied head once
        if id(p) in emb_ids:
            kind = "embedding"
        elif id(p) in head_ids:
            kind = "lm_head"
        else:
            kind = classify(name, p.dim())
        parts[kind] += p.numel()
    routed = parts["routed_experts"]
    if routed == 0 or routed % E:
        raise ConfigError(f"{source}: the generic path found {routed} routed-expert parameters in the {model_type} "
                          f"model, not a multiple of {experts[0]}={E}; it cannot size this family")
    total = sum(parts.values())
    n_layers = int(d.get("num_hidden_layers") or d.get("n_layers") or 1)
    heads = d.get("num_attention_heads")
    attention = None
    if isinstance(heads, int) and heads > 0:
        kv = d.get("num_key_value_heads") or heads
        head_dim = d.get("head_dim") or d.get("hidden_size", 0) // heads
        if isinstance(kv, int) and heads % kv == 0 and isinstance(head_dim, int) and head_dim > 0:
            attention = AttentionSpec(n_heads=heads, n_kv_heads=kv, head_dim=head_dim)
    kinds = set(d.get("layer_types") or []) - {"full_attention", "sliding_attention", "chunked_attention"}
    notes = [
        f"generic path: transformers {transformers.__version__} {type(model).__name__} on the meta device, "
        f"parameters classified by module names ({', '.join(f'{k} {v:,}' for k, v in parts.items() if v)}); "
        f"active = all but routed experts + {K}/{E} of them ({top_k[0]}, {experts[0]})",
    ]
    if kinds or attention is None:
        notes.append(f"hybrid or non-GQA layers ({', '.join(sorted(kinds)) or 'attention shape not in config'}): "
                     "KV cache and attention FLOPs count every layer as full GQA attention (an upper bound; "
                     "linear-attention / Mamba layers keep a fixed-size state instead)")
    return ExplicitSpec(
        name=d.get("_name_or_path") or cfg.get("_name_or_path") or model_type,
        shared_params=total - routed,
        expert_params=routed // E,
        num_experts=E,
        top_k=K,
        embedding_params=parts["embedding"],
        lm_head_params=parts["lm_head"],
        n_layers=n_layers,
        attention=attention,
        notes=tuple(notes),
    )
