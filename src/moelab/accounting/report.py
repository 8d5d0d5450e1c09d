"""`moelab size` results: one dict per model (the stable JSON schema) and a text table.

The table is rendered from the same dicts as the JSON, so the two never
disagree. The schema is documented in docs/size.md; add keys, never rename.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moelab.accounting.flops import attention_flops_per_token, forward_flops_per_token
from moelab.accounting.formats import MOELAB_FORMATS, format_bytes, memory_plan
from moelab.accounting.hf_config import ALIASES as HF_ALIASES
from moelab.accounting.hf_config import FAMILIES as HF_FAMILIES
from moelab.accounting.hf_config import load_hf_config, spec_from_hf_config
from moelab.accounting.memory import (
    USABLE_FRACTION,
    WEIGHT_DTYPES,
    bytes_per_param,
    kv_cache_bytes,
    min_gpus,
    weight_bytes,
)
from moelab.accounting.moelab_config import (
    moelab_presets,
    spec_from_moelab_config,
    spec_from_moelab_run,
)
from moelab.accounting.parallel import expert_parallel_report
from moelab.accounting.params import ParamCount, count_params
from moelab.accounting.published import PRESETS, Preset
from moelab.accounting.spec import ArchSpec, Spec
from moelab.errors import ConfigError
from moelab.rundir.files import is_run_dir

SCHEMA_VERSION = 1

CONVENTIONS = {
    "active_params": "parameters one token uses: all but the unselected routed experts; "
    "includes the whole input embedding table and the LM head",
    "no_embed": "excludes the input embedding table and the LM head (once if tied)",
    "flops_per_token": "forward FLOPs = 2 x active matmul params (LM head in, embedding lookup "
    "and norms out) + attention QK^T and AV at the causal average over `context` tokens",
    "training_flops_per_token": "3 x forward FLOPs",
    "bytes": "GB = 1e9 bytes; weights hold every expert; int4/fp8 exclude quantisation scales",
    "min_gpus": f"ceil((weights at dtype + KV cache) / ({USABLE_FRACTION:g} x gpu memory))",
    "dense_equivalents": "dense models with the same attention and embeddings and N params, "
    "N = the MoE's active (same compute) or total (same memory) params",
}


def resolve(name_or_path: str) -> tuple[Spec, str, Preset | None]:
    """A size preset, a moelab model preset (`moelab.model.presets`), or a path to a
    config.json (file or folder): a moelab run directory when its config names the
    moelab format (read by `moelab.rundir.files.read_run_config`), else Hugging Face."""
    if name_or_path in PRESETS:
        preset = PRESETS[name_or_path]
        return preset.build(), f"preset {preset.name} ({preset.source})", preset
    ours = moelab_presets()
    if name_or_path in ours:
        spec = spec_from_moelab_config(ours[name_or_path], name=name_or_path)
        return spec, f"moelab model preset {name_or_path}", None
    path = Path(name_or_path)
    if path.exists():
        if is_run_dir(path):
            spec, source = spec_from_moelab_run(path)
            return spec, source, None
        cfg, source = load_hf_config(path)
        if cfg.get("model_type") not in HF_FAMILIES and cfg.get("model_type") not in HF_ALIASES:
            # No exact reader: transformers' own model, counted on the meta device.
            from moelab.accounting.generic import spec_from_meta_model

            return spec_from_meta_model(cfg, source=source), source, None
        return spec_from_hf_config(cfg, source=source), source, None
    raise ConfigError(
        f"{name_or_path!r} is neither a preset nor an existing path; presets: "
        f"{', '.join(PRESETS)}; moelab model presets: {', '.join(ours) or 'none'} "
        "(or give a config.json / model folder)"
    )


def _dense_equivalent(
    params: int, counts: ParamCount, attn_flops: float, kv: float, dtype: str, gpu: float
) -> dict[str, Any]:
    # Same embedding and norms as the MoE: only the matmul part changes with N.
    flops = 2 * (params - counts.embedding - counts.norms) + attn_flops
    weights = params * bytes_per_param(dtype)
    return {
        "params": params,
        "flops_per_token": flops,
        "weight_bytes": weights,
        "min_gpus": min_gpus(weights + kv, gpu),
    }


def size_report(
    spec: Spec,
    *,
    source: str = "",
    preset: Preset | None = None,
    dtype: str = "bf16",
    context: int = 4096,
    batch: int = 1,
    gpu_memory_gb: float = 80.0,
    ep: int | None = None,
    nodes: int = 1,
    memory_gb: float | None = None,
) -> dict[str, Any]:
    """Everything `moelab size` reports about one model, as a JSON-ready dict; with `ep`,
    an ``expert_parallel`` block (`moelab.accounting.parallel`); with `memory_gb`, a
    ``memory_plan`` block: each moelab format resident, offloaded or not at all on that
    memory (`moelab.accounting.formats`)."""
    if context <= 0 or batch <= 0:
        raise ConfigError(f"context and batch must be > 0, got context={context}, batch={batch}")
    counts = count_params(spec)
    attn = attention_flops_per_token(spec, context)
    forward = forward_flops_per_token(spec, counts, context)
    kv = kv_cache_bytes(spec, context=context, batch=batch, dtype=dtype)
    weights = {d: weight_bytes(counts, d) for d in WEIGHT_DTYPES}
    serving = weight_bytes(counts, dtype) + kv
    # moelab's checkpoint formats: the non-expert weights stay at a float dtype moelab runs.
    rest = dtype if dtype in ("fp32", "bf16", "fp16") else "bf16"
    formats = {f: format_bytes(spec, counts, f, rest=rest) for f in MOELAB_FORMATS if _divides(spec, counts, f, rest)}
    components = {
        "embedding": counts.embedding,
        "lm_head": counts.lm_head,
        "attention": counts.attention,
        "norms": counts.norms,
        "dense_ffn": counts.dense_ffn,
        "shared_experts": counts.shared_experts,
        "router": counts.router,
        "routed_experts": counts.routed_experts,
        "other": counts.other,
    }
    moe_layers = [
        {
            "layers": list(g.layers),
            "count": len(g.layers),
            "experts": g.num_experts,
            "active_experts": g.top_k,
            "skipped_experts": g.skipped,
            "shared_experts": g.num_shared,
            "params_per_expert": g.params_per_expert,
            "ffn_compute_saved": g.ffn_compute_saved,
        }
        for g in counts.moe_groups
    ]
    n_layers = spec.n_layers
    return {
        "schema_version": SCHEMA_VERSION,
        "name": spec.name,
        "source": source,
        "settings": {
            "dtype": dtype,
            "context": context,
            "batch": batch,
            "gpu_memory_gb": gpu_memory_gb,
            "usable_fraction": USABLE_FRACTION,
        },
        "total_params": counts.total,
        "active_params": counts.active,
        "total_params_no_embed": counts.total_no_embed,
        "active_params_no_embed": counts.active_no_embed,
        "tied_embeddings": spec.tie_embeddings if isinstance(spec, ArchSpec) else False,
        "params_by_component": components,
        "n_layers": n_layers,
        "moe_layers": moe_layers,
        "flops_per_token": forward,
        "attention_flops_per_token": attn,
        "training_flops_per_token": 3 * forward,
        "weight_bytes": weights,
        "kv_cache_bytes": kv,
        "serving_bytes": serving,
        "min_gpus": min_gpus(serving, gpu_memory_gb),
        "dense_equivalents": {
            "same_active": _dense_equivalent(counts.active, counts, attn, kv, dtype, gpu_memory_gb),
            "same_total": _dense_equivalent(counts.total, counts, attn, kv, dtype, gpu_memory_gb),
        },
        "published": None
        if preset is None
        else {
            "total_params": preset.published_total,
            "active_params": preset.published_active,
            "source": preset.source,
            "includes_unsized_params": preset.published_extra,
            "active_convention": "without the input embedding table" if preset.active_excludes_embedding
            else "with embeddings",
        },
        "conventions": CONVENTIONS,
        "notes": list(spec.notes) + _preset_notes(preset, counts),
        "moelab_format_bytes": {"rest_dtype": rest, "int4_group_size": 128, "bytes": formats},
        "memory_plan": None if memory_gb is None else {
            "memory_gb": memory_gb, "usable_fraction": USABLE_FRACTION,
            "formats": [f.to_dict() for f in memory_plan(spec, counts, memory_gb * 1e9, kv_bytes=kv, rest=rest)],
        },
        "expert_parallel": None if ep is None else expert_parallel_report(spec, counts, ep=ep, nodes=nodes,
                                                                          activation_dtype="bf16"),
    }


def _divides(spec: Spec, counts: ParamCount, fmt: str, rest: str) -> bool:
    try:
        format_bytes(spec, counts, fmt, rest=rest)
    except ConfigError:  # int4 groups of 128 do not divide this model's expert dims
        return False
    return True


def _preset_notes(preset: Preset | None, counts: ParamCount | None = None) -> list[str]:
    notes = []
    if preset is not None and preset.published_extra:
        notes.append(
            f"text model only: the published {fmt_params(preset.published_total)} total also counts "
            f"{fmt_params(preset.published_extra)} of vision encoder + projector"
        )
    if preset is not None and preset.active_excludes_embedding and counts is not None:
        notes.append(
            f"the published {fmt_params(preset.published_active)} active leaves out the input embedding table: "
            f"{fmt_params(counts.active - counts.embedding)} in that convention, "
            f"{fmt_params(counts.active)} with it (moelab's 'active')"
        )
    return notes


def fmt_params(n: float) -> str:
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


def fmt_bytes(n: float) -> str:
    for scale, unit in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "KB")):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def fmt_flops(n: float) -> str:
    for scale, unit in ((1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP")):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} FLOP"


def _moe_cell(r: dict[str, Any], key: str) -> str:
    groups = r["moe_layers"]
    if not groups:
        return "-"
    cells = []
    for g in groups:
        cells.append(
            {
                "layers": f"{g['count']} of {r['n_layers']}",
                "experts": f"{g['experts']} routed + {g['shared_experts']} shared",
                "active": f"{g['active_experts']} of {g['experts']}",
                "skipped": f"{g['skipped_experts']} of {g['experts']}",
                "saved": f"{100 * g['ffn_compute_saved']:.0f}%",
            }[key]
        )
    return "; ".join(cells)


def _dense_cell(d: dict[str, Any]) -> str:
    gpus = f"{d['min_gpus']} GPU" + ("s" if d["min_gpus"] > 1 else "")
    return f"{fmt_params(d['params'])}, {fmt_flops(d['flops_per_token'])}, {fmt_bytes(d['weight_bytes'])}, {gpus}"


Row = tuple[str, list[str]] | str  # (label, one cell per model) or a section title


def headline(r: dict[str, Any]) -> str:
    """The report in one sentence, e.g. "63.0B total, 21.0B active, 6 of 8 experts skipped,
    75% of feed-forward compute saved" (a dense model: just its total). Built from the same
    cells as the table, so the sentence and the table never disagree."""
    words = f"{fmt_params(r['total_params'])} total, {fmt_params(r['active_params'])} active"
    if r["moe_layers"]:
        words += (f", {_moe_cell(r, 'skipped')} experts skipped, "
                  f"{_moe_cell(r, 'saved')} of feed-forward compute saved")
    return words


def table_rows(reports: list[dict[str, Any]]) -> list[Row]:
    """The rows of `render_table` (formatted cells, one per model), also served as JSON by
    `moelab playground` so that the page shows exactly the text `moelab size` prints."""
    s = reports[0]["settings"]
    dt, ctx, batch, gpu = s["dtype"], s["context"], s["batch"], s["gpu_memory_gb"]
    rows: list[Row] = [
        "parameters",
        ("total", [fmt_params(r["total_params"]) for r in reports]),
        ("active per token", [fmt_params(r["active_params"]) for r in reports]),
        ("total, no embeddings", [fmt_params(r["total_params_no_embed"]) for r in reports]),
        ("active, no embeddings", [fmt_params(r["active_params_no_embed"]) for r in reports]),
        ("embedding + LM head", [
            f"{fmt_params(r['params_by_component']['embedding'])} + "
            + ("tied" if r["tied_embeddings"] else fmt_params(r["params_by_component"]["lm_head"]))
            for r in reports
        ]),
        ("published total/active", [
            f"{fmt_params(r['published']['total_params'])} / {fmt_params(r['published']['active_params'])}"
            if r["published"] else "-" for r in reports
        ]),
        "MoE layers",
        ("MoE layers", [_moe_cell(r, "layers") for r in reports]),
        ("experts", [_moe_cell(r, "experts") for r in reports]),
        ("routed experts active", [_moe_cell(r, "active") for r in reports]),
        ("routed experts skipped", [_moe_cell(r, "skipped") for r in reports]),
        ("FFN compute saved", [_moe_cell(r, "saved") for r in reports]),
        f"compute per token (context {ctx}, causal average)",
        ("forward FLOPs", [fmt_flops(r["flops_per_token"]) for r in reports]),
        ("  of which attention", [fmt_flops(r["attention_flops_per_token"]) for r in reports]),
        ("training FLOPs (3x)", [fmt_flops(r["training_flops_per_token"]) for r in reports]),
        "memory",
        *[(f"weights {d}", [fmt_bytes(r["weight_bytes"][d]) for r in reports]) for d in WEIGHT_DTYPES],
        (f"KV cache {dt}, {ctx} x {batch}", [fmt_bytes(r["kv_cache_bytes"]) for r in reports]),
        (f"min GPUs ({gpu:g} GB, {USABLE_FRACTION:.0%} usable)", [str(r["min_gpus"]) for r in reports]),
        f"dense equivalents (params, forward FLOPs, {dt} weights, GPUs)",
        ("same active compute", [_dense_cell(r["dense_equivalents"]["same_active"]) for r in reports]),
        ("same total params", [_dense_cell(r["dense_equivalents"]["same_total"]) for r in reports]),
    ]
    rest = reports[0]["moelab_format_bytes"]["rest_dtype"]
    rows += [f"moelab checkpoint formats (routed experts at each format, the rest {rest}; int4 groups of 128)",
             *[(f"weights {f}", [_format_cell(r, f) for r in reports]) for f in MOELAB_FORMATS]]
    if any(r.get("memory_plan") for r in reports):
        plan = next(r["memory_plan"] for r in reports if r.get("memory_plan"))
        rows += [f"on {plan['memory_gb']:g} GB ({USABLE_FRACTION:.0%} usable)",
                 *[(f"  {f}", [_plan_cell(r, f) for r in reports]) for f in MOELAB_FORMATS]]
    if any(r.get("expert_parallel") for r in reports):
        rows += _ep_rows(reports, dt)
    return rows


def render_table(reports: list[dict[str, Any]]) -> str:
    """A plain-text table, one column per model, rows grouped by question."""
    rows = table_rows(reports)
    header = [r["name"] for r in reports]
    label_w = max(len(row[0]) for row in rows if isinstance(row, tuple))
    col_w = [
        max([len(header[i])] + [len(row[1][i]) for row in rows if isinstance(row, tuple)])
        for i in range(len(reports))
    ]
    out = [" ".join([" " * label_w] + [h.rjust(w) for h, w in zip(header, col_w, strict=True)])]
    for row in rows:
        if isinstance(row, str):
            out.append(f"-- {row} --")
            continue
        label, cells = row
        out.append(" ".join([label.ljust(label_w)] + [c.rjust(w) for c, w in zip(cells, col_w, strict=True)]))
    out.append("")
    out.extend(f"in short ({r['name']}): {headline(r)}" for r in reports)
    out.append("")
    out.append("conventions:")
    out.extend(f"  {k}: {v}" for k, v in CONVENTIONS.items())
    for r in reports:
        for note in r["notes"]:
            out.append(f"  note ({r['name']}): {note}")
    return "\n".join(out)


def _format_cell(r: dict[str, Any], fmt: str) -> str:
    b = r["moelab_format_bytes"]["bytes"].get(fmt)
    return "-" if b is None else fmt_bytes(b)


def _plan_cell(r: dict[str, Any], fmt: str) -> str:
    fit = next((f for f in (r.get("memory_plan") or {}).get("formats", []) if f["format"] == fmt), None)
    if fit is None:
        return "-"
    if fit["fits"]:
        return "fits resident"
    if fit["runs"]:
        return (f"--expert-memory {fmt_bytes(fit['expert_budget'])} "
                f"({100 * fit['resident_fraction']:.0f}% of experts)")
    return f"does not fit (runs from {fmt_bytes(fit['smallest_memory'])})"


def _ep_rows(reports: list[dict[str, Any]], dt: str) -> list[Row]:
    eps = [r["expert_parallel"] for r in reports]
    first = next(e for e in eps if e)
    cell = lambda f: [f(e) if e else "-" for e in eps]  # noqa: E731
    return [
        f"expert parallelism (--ep {first['ep']}, --nodes {first['nodes']}; all-to-all rows at bf16)",
        ("experts per rank", cell(lambda e: "; ".join(str(g["experts_per_rank"]) for g in e["moe_layers"]))),
        ("all-to-all per token, per MoE layer", cell(
            lambda e: "; ".join(fmt_bytes(g["all_to_all_bytes_per_token"]) for g in e["moe_layers"]))),
        ("  of which crosses ranks (balanced)", cell(
            lambda e: "; ".join(fmt_bytes(g["cross_rank_bytes_per_token"]) for g in e["moe_layers"]))),
        ("  of which crosses nodes (balanced)", cell(
            lambda e: "; ".join(fmt_bytes(g["cross_node_bytes_per_token"]) for g in e["moe_layers"]))),
        ("all-to-all per token, all layers", cell(lambda e: fmt_bytes(e["all_to_all_bytes_per_token"]))),
        ("  training (forward + backward)", cell(lambda e: fmt_bytes(e["training_all_to_all_bytes_per_token"]))),
        (f"expert weights per rank {dt}", cell(lambda e: fmt_bytes(e["expert_bytes_per_rank"].get(dt, 0.0)))),
        (f"all weights per rank {dt}", cell(lambda e: fmt_bytes(e["bytes_per_rank"].get(dt, 0.0)))),
    ]


def preset_lines() -> list[str]:
    """One line per preset: name, published total/active, description."""
    width = max(len(name) for name in PRESETS)
    return [
        f"{p.name.ljust(width)}  {fmt_params(p.published_total):>6} / "
        f"{fmt_params(p.published_active):<6} {p.description}"
        for p in PRESETS.values()
    ]
