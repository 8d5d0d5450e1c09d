"""An expert-specialisation analysis on disk: the held-out tokens it routes, the files it
writes (``analysis.json``, ``analysis.html``, PNG plots), the lines the CLI prints, and
`analyze_checkpoint`, which does all of it for a saved model.

The statistics themselves are `moelab.lab.specialization.stats`; the HTML is
`moelab.lab.report`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moelab.errors import DataError
from moelab.io import atomic_write_json, atomic_write_text
from moelab.lab import plots
from moelab.lab.report import analysis_html_fragment
from moelab.lab.specialization.stats import AnalysisConfig, SpecializationResult, analyze_model


def write_analysis(result: SpecializationResult, out_dir: str | Path) -> SpecializationResult:
    """Write ``analysis.json``, ``analysis.html`` and PNG plots into `out_dir`.

    Returns the result with `files` filled in (paths relative to `out_dir`).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    heat = plots.plot_domain_heatmaps(result.domain_share_by_layer(), result.domains,
                                      out / "plots" / "specialization_heatmap.png")
    co = plots.plot_coactivation(result.coactivation_by_layer(), out / "plots" / "coactivation.png")
    result.files = {
        "json": "analysis.json",
        "html": "analysis.html",
        "heatmap": str(heat.relative_to(out)),
        "coactivation": str(co.relative_to(out)),
    }
    images = {"heatmap": plots.data_uri(heat), "coactivation": plots.data_uri(co)}
    d = result.to_dict()
    atomic_write_text(out / "analysis.html", analysis_html_fragment(d, images))
    atomic_write_json(out / "analysis.json", d)
    return result


def summary_lines(result: SpecializationResult) -> list[str]:
    """Short human summary (the CLI prints these)."""
    lines = [f"{result.num_experts} experts, top-{result.top_k}; domains: {', '.join(result.domains)}"]
    if result.data:
        lines.insert(0, f"held-out data: {result.data}")
    head = f"{'layer':>5}  {'max score':>9}  {'1st same':>8}  {'(random)':>8}  {'top-k ovl':>9}  {'(random)':>8}  most specialised"
    lines.append(head)
    for ls in result.layers:
        c = ls.consistency["all"]
        best_d, best_e, best = "", 0, -1.0
        for d, row in ls.specialization_score.items():
            e = int(np.argmax(row))
            if row[e] > best:
                best_d, best_e, best = d, e, row[e]
        lines.append(
            f"{ls.layer:>5}  {ls.max_score:>9.2f}  {c.first_choice_same:>8.3f}  {c.random_first_choice:>8.3f}  "
            f"{c.topk_overlap:>9.3f}  {c.random_topk_overlap:>8.3f}  expert {best_e} on {best_d} ({best:.2f}x uniform)"
        )
    return lines


def held_out_tokens(data: Any, tokenizer: Any | None, tokens_per_domain: int) -> dict[str, np.ndarray]:
    """Each domain's validation tokens in the *model's* tokenizer.

    When the model was trained with the data's tokenizer (the same ``tokenizer.json``),
    the prepared arrays are used as they are; otherwise the validation text is decoded
    with the data's tokenizer and re-encoded with the model's (imported checkpoints).
    """
    same = tokenizer is None or tokenizer.to_str() == data.tokenizer.to_str()
    out: dict[str, np.ndarray] = {}
    for d in data.domains:
        arr = np.asarray(data.val[d])
        if same:
            out[d] = arr[: tokens_per_domain + 1]
        else:
            text = data.tokenizer.decode(arr[: 2 * tokens_per_domain].tolist(), skip_special_tokens=False)
            out[d] = np.asarray(tokenizer.encode(text, add_special_tokens=False).ids[:tokens_per_domain + 1])
    return out


def analyze_checkpoint(
    path: str | Path,
    *,
    data_paths: Sequence[str | Path] | None = None,
    cache_dir: str | Path | None = None,
    config: AnalysisConfig | None = None,
    out_dir: str | Path | None = None,
    verify: bool = True,
    device: str = "cpu",
    dtype: Any = None,
) -> SpecializationResult:
    """Analyse a moelab run directory (float or quantised) or ``model.safetensors`` on held-out data.

    Held-out data: the validation split of `data_paths` when given; else of the data the
    run was trained on (its recorded recipe, `held_out_recipe`); else (an imported model,
    a run without a recipe) of the default corpus. Prepared with `moelab.data`, cached.
    The result's ``data`` says which. Writes the analysis into `out_dir` (default: the run
    directory) and returns it. `device` / `dtype` (a torch dtype; None keeps the
    checkpoint's float32) are where and how the model runs.
    """
    from moelab.data.loader import DataConfig, prepare_data, prepare_data_from_config
    from moelab.data.tokenizer import load_tokenizer
    from moelab.hf.native import load_any

    cfg = config or AnalysisConfig()
    loaded = load_any(path, verify=verify, device=device)  # float or quantised runs (and Hugging Face folders)
    if dtype is not None:
        loaded.model.to(dtype)
    tokenizer = load_tokenizer(loaded.tokenizer_path) if loaded.tokenizer_path else None
    recipe = None if data_paths else held_out_recipe(path)
    if data_paths:
        data = prepare_data(cache_dir, data_paths=list(data_paths))
        described = f"--data {' '.join(str(p) for p in data_paths)} (validation split)"
    elif recipe is not None:
        try:
            data = prepare_data_from_config(DataConfig(**recipe), cache_dir)
        except DataError as e:
            raise DataError(f"{path}: cannot rebuild the data the run was trained on ({e}); "
                            "pass --data PATH for the held-out text") from None
        paths = recipe.get("data_paths") or []
        described = (f"the run's training data, {' '.join(paths)} (validation split)" if paths else
                     "the run's training data, the default corpus (validation split)")
    else:
        data = prepare_data(cache_dir)
        described = "the default corpus (validation split; no data recipe recorded for this model)"
    if tokenizer is None and data.vocab_size > loaded.config.vocab_size:
        raise DataError(
            f"{path} has no tokenizer.json and its vocab_size={loaded.config.vocab_size} is smaller than the "
            f"data's tokenizer ({data.vocab_size}); put the model's tokenizer.json beside it"
        )
    tokens = held_out_tokens(data, tokenizer, cfg.tokens_per_domain)
    result = analyze_model(loaded.model, tokens, tokenizer=tokenizer or data.tokenizer, config=cfg,
                           source=str(path))
    result.data = described
    return write_analysis(result, out_dir if out_dir is not None else loaded.run_dir)


def held_out_recipe(path: str | Path) -> dict | None:
    """The `DataConfig` fields a moelab run recorded for its training data (config.json's
    ``data.config``), or None (an imported model, a converted run, an older run)."""
    from moelab.rundir import is_run_dir, read_run_config

    if not is_run_dir(path):
        return None
    recipe = (read_run_config(path).get("data") or {}).get("config")
    return recipe if isinstance(recipe, dict) else None
