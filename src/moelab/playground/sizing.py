"""The Size panel: architecture controls -> `moelab.accounting`'s report, formatted as
`moelab size` formats it.

Nothing is computed here. The controls become a moelab `ModelConfig` (the same fields a
moelab config.json holds under "model", so ``moelab size that.json`` sizes the same model
through the same `spec_from_moelab_config`); presets and uploaded config.json files go
through `moelab.accounting.report.resolve`, the CLI's own reader. The reply carries the
report dict (raw numbers), `table_rows` (the formatted cells `moelab size` prints) and
`headline` (its "in short" line).
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from pathlib import Path
from typing import Any

from moelab.accounting.memory import BYTES_PER_PARAM
from moelab.accounting.moelab_config import moelab_presets, spec_from_moelab_config
from moelab.accounting.params import count_params
from moelab.accounting.published import PRESETS
from moelab.accounting.report import headline, resolve, size_report, table_rows
from moelab.accounting.spec import ArchSpec, ExplicitSpec, MoESpec, Spec
from moelab.model.config import ModelConfig
from moelab.playground.config import FieldError

# The controls of the Size panel, in page order: (name, label, default). The defaults are
# Mixtral 8x7B's shape, so the first page shows a real model (46.7B / 12.9B).
CONTROLS: tuple[tuple[str, str, int | bool], ...] = (
    ("n_layers", "layers", 32),
    ("d_model", "d_model", 4096),
    ("n_heads", "attention heads", 32),
    ("n_kv_heads", "KV heads", 8),
    ("num_experts", "experts E (0: dense)", 8),
    ("top_k", "active k", 2),
    ("d_expert", "expert width F", 14336),
    ("num_shared_experts", "shared experts", 0),
    ("moe_layer_freq", "MoE every n layers", 1),
    ("first_dense_layers", "first k dense", 0),
    ("d_ff", "dense FFN width", 14336),
    ("vocab_size", "vocab", 32000),
    ("tie_embeddings", "tie embeddings", False),
)
SETTINGS_DEFAULTS: dict[str, Any] = {"dtype": "bf16", "context": 4096, "batch": 1, "gpu_memory_gb": 80.0}

_MOE_FIELDS = ("num_experts", "top_k", "d_expert", "num_shared_experts")
_FIELD = re.compile(r"\b(?:ModelConfig|MoEConfig)\.(\w+)")


def model_dict(controls: dict[str, Any]) -> dict[str, Any]:
    """The controls (unset ones at their defaults) as the "model" entry of a moelab
    config.json, not yet validated."""
    values = {name: default for name, _, default in CONTROLS}
    unknown = set(controls) - set(values)
    if unknown:
        raise FieldError(f"unknown control(s) {sorted(unknown)}; known: {', '.join(values)}", sorted(unknown)[0])
    values.update(controls)
    moe = {k: values.pop(k) for k in _MOE_FIELDS}
    # E = 0 is the dense model (every FFN of width d_ff), the baseline of the comparison.
    dense = moe["num_experts"] == 0 and not isinstance(moe["num_experts"], bool)
    return {**values, "moe": None if dense else {"d_model": values["d_model"], **moe}}


def model_config(controls: dict[str, Any]) -> ModelConfig:
    """The moelab `ModelConfig` the controls describe; a `FieldError` naming the control
    whose value the library refused, with the library's own message (the one line
    `moelab size` prints for the same config.json, after its "the model config is invalid: ")."""
    d = model_dict(controls)
    try:
        return ModelConfig.from_dict(d)
    except (ValueError, TypeError) as e:
        m = _FIELD.search(str(e))
        raise FieldError(str(e), m.group(1) if m and m.group(1) in {c[0] for c in CONTROLS} else None) from None


def moelab_config_json(controls: dict[str, Any], *, validate: bool = True) -> dict[str, Any]:
    """The controls as a moelab config.json (``moelab size`` reads it): for the page's
    "download config.json" link and for the tests that compare the page with the CLI."""
    from moelab.rundir.files import RUN_FORMAT, RUN_VERSION

    model = model_config(controls).to_dict() if validate else model_dict(controls)
    return {"format": RUN_FORMAT, "version": RUN_VERSION, "model": model}


def settings_of(raw: dict[str, Any] | None) -> dict[str, Any]:
    """The serving settings (`moelab size`'s --dtype, --context, --batch, --gpu-memory)."""
    s = dict(SETTINGS_DEFAULTS)
    raw = raw or {}
    unknown = set(raw) - set(s)
    if unknown:
        raise FieldError(f"unknown setting(s) {sorted(unknown)}; known: {', '.join(s)}", sorted(unknown)[0])
    s.update(raw)
    if s["dtype"] not in BYTES_PER_PARAM:
        raise FieldError(f"dtype {s['dtype']!r} is not known; expected one of {', '.join(BYTES_PER_PARAM)}", "dtype")
    for name in ("context", "batch"):
        if not isinstance(s[name], int) or isinstance(s[name], bool) or s[name] <= 0:
            raise FieldError(f"{name} must be a positive integer, got {s[name]!r}", name)
    g = s["gpu_memory_gb"]
    if not isinstance(g, int | float) or isinstance(g, bool) or not math.isfinite(g) or g <= 0:
        raise FieldError(f"gpu_memory_gb must be a number > 0, got {g!r}", "gpu_memory_gb")
    s["gpu_memory_gb"] = float(g)
    return s


def _reply(spec: Spec, source: str, preset: Any, settings: dict[str, Any], **extra: Any) -> dict[str, Any]:
    report = size_report(spec, source=source, preset=preset, dtype=settings["dtype"], context=settings["context"],
                         batch=settings["batch"], gpu_memory_gb=settings["gpu_memory_gb"])
    rows = [{"section": r} if isinstance(r, str) else {"label": r[0], "value": r[1][0]} for r in table_rows([report])]
    return {"name": report["name"], "source": source, "headline": headline(report), "rows": rows,
            "report": report, **extra}


def size_controls(controls: dict[str, Any], settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Size the model the controls describe."""
    cfg = model_config(controls)
    return _reply(spec_from_moelab_config(cfg, name="custom"), "playground controls", None, settings_of(settings),
                  controls=controls_of_model_config(cfg))


def size_named(name: str, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Size a size preset or a moelab model preset by name (`resolve`, as `moelab size NAME`)."""
    if not isinstance(name, str) or (name not in PRESETS and name not in moelab_presets()):
        raise FieldError(f"unknown preset {name!r}; presets: {', '.join([*PRESETS, *moelab_presets()])}", "preset")
    spec, source, preset = resolve(name)
    return _reply(spec, source, preset, settings_of(settings), controls=controls_of_spec(spec, name))


def size_path(path: Path, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Size a config.json or model folder the server may read (checked by the caller)."""
    if not path.exists():
        raise FieldError(f"{path}: no such file or folder", "path")
    spec, source, preset = _resolve_as(path, "path")
    return _reply(spec, source, preset, settings_of(settings), controls=controls_of_spec(spec, None))


def size_upload(text: str, filename: str = "config.json", settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Size an uploaded config.json: written to a temporary folder and read by `resolve`, the
    CLI's path; messages name `filename` where they would name the temporary file."""
    if not isinstance(text, str):
        raise FieldError(f"config_text must be the text of a config.json, got {type(text).__name__}", "config_text")
    name = Path(str(filename or "config.json")).name
    with tempfile.TemporaryDirectory(prefix="moelab-playground-") as tmp:
        path = Path(tmp) / "config.json"
        path.write_text(text, encoding="utf-8")
        try:
            spec, source, preset = _resolve_as(path, "config_text")
        except FieldError as e:
            raise FieldError(str(e).replace(str(path), name).replace(tmp, name), e.field) from None
        reply = _reply(spec, name, preset, settings_of(settings), controls=controls_of_spec(spec, None))
        # The temporary folder means nothing to the user: every mention of it names the upload.
        text = json.dumps(reply).replace(json.dumps(str(path))[1:-1], name).replace(json.dumps(tmp)[1:-1], name)
    return json.loads(text)


def _resolve_as(path: Path, field: str) -> tuple[Spec, str, Any]:
    try:
        return resolve(str(path))
    except (ValueError, OSError) as e:  # ConfigError, DataError, CheckpointError are ValueErrors
        raise FieldError(str(e), field) from None


def controls_of_model_config(cfg: ModelConfig) -> dict[str, Any]:
    """The controls that rebuild `cfg` exactly (for a moelab model preset)."""
    out: dict[str, Any] = {name: getattr(cfg, name) for name, _, _ in CONTROLS if hasattr(cfg, name)}
    out["n_kv_heads"] = cfg.kv_heads
    if cfg.moe is not None:
        out.update({k: getattr(cfg.moe, k) for k in _MOE_FIELDS})
    else:
        out["num_experts"] = 0
    return out


def controls_of_spec(spec: Spec, name: str | None) -> dict[str, Any]:
    """The controls nearest to a spec, to show its shape; a preset's numbers always come
    from the preset itself (attention variants such as MLA have no control)."""
    ours = moelab_presets()
    if name in ours:
        return controls_of_model_config(ours[name])
    if isinstance(spec, ExplicitSpec):
        out: dict[str, Any] = {"num_experts": spec.num_experts, "top_k": spec.top_k, "n_layers": spec.n_layers}
        if spec.attention is not None:
            out.update(n_heads=spec.attention.n_heads, n_kv_heads=spec.attention.n_kv_heads or spec.attention.n_heads)
        return out
    assert isinstance(spec, ArchSpec)
    attn = spec.layers[0].attention
    out = {"n_layers": spec.n_layers, "d_model": spec.d_model, "vocab_size": spec.vocab_size,
           "tie_embeddings": spec.tie_embeddings, "n_heads": attn.n_heads,
           "n_kv_heads": attn.n_kv_heads if attn.kind == "gqa" else attn.n_heads}
    moe_at = [i for i, layer in enumerate(spec.layers) if isinstance(layer.ffn, MoESpec)]
    dense = next((layer.ffn for layer in spec.layers if not isinstance(layer.ffn, MoESpec)), None)
    if moe_at:
        m = spec.layers[moe_at[0]].ffn
        assert isinstance(m, MoESpec)
        freq = moe_at[1] - moe_at[0] if len(moe_at) > 1 else 1
        out.update(num_experts=m.num_experts, top_k=m.top_k, d_expert=m.expert.d_ff,
                   num_shared_experts=m.num_shared or (1 if m.shared is not None else 0),
                   moe_layer_freq=freq, first_dense_layers=max(0, moe_at[0] - (freq - 1)))
    if dense is not None:
        out["d_ff"] = dense.d_ff
    elif moe_at:
        out["d_ff"] = out["d_expert"]
    return out


def presets() -> list[dict[str, Any]]:
    """Every size preset (with its published figures) and moelab model preset, with the
    controls that show its shape."""
    out = []
    for p in PRESETS.values():
        out.append({"name": p.name, "kind": "published", "description": p.description, "source": p.source,
                    "published_total": p.published_total, "published_active": p.published_active,
                    "controls": controls_of_spec(p.build(), p.name), "exact_controls": False})
    for name, cfg in moelab_presets().items():
        controls = controls_of_model_config(cfg)
        # Exact when the controls alone rebuild the preset's counts (not, e.g., with a
        # shared-expert width of its own).
        exact = (count_params(spec_from_moelab_config(model_config(controls))).total
                 == count_params(spec_from_moelab_config(cfg)).total)
        out.append({"name": name, "kind": "moelab", "description": "moelab model preset (moelab.model.presets)",
                    "source": "moelab.model.presets", "published_total": None, "published_active": None,
                    "controls": controls, "exact_controls": exact})
    return out
