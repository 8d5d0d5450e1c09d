"""`build_report`: one self-contained HTML file from run, lab and analysis folders.

Self-contained means a single file with inline CSS and every image a ``data:`` URI: no
scripts, no stylesheets, fonts or images fetched from anywhere, so it opens offline and
can be mailed around. Sections, in order: summary, training curves, expert load over
training, failure-mode verdicts, specialisation heatmaps, coloured text. A section with
nothing to show says so rather than disappearing, so a reader knows what was not run.

What a folder is, is read from its files: ``experiment.json`` (a lab experiment, whose
runs are sub-folders), ``metrics.jsonl`` (a training run), ``analysis.json`` (a
specialisation analysis, usually inside a run folder), ``comparison.json`` (a `moelab
compare` folder, whose runs are sub-folders: the summary shows its trade-off table,
quality per FLOP beside quality per byte). A folder with none of these is searched
down to two levels below it.

This module owns every piece of analysis HTML too (tables, coloured text, the
``analysis.html`` fragment): functions of ``analysis.json``'s dict, not of the statistics code.
"""

from __future__ import annotations

import html
import json
import logging
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moelab.errors import DataError
from moelab.io import atomic_write_text
from moelab.lab import plots
from moelab.lab.failures import load_experiment, verdict_table
from moelab.lab.metrics import RunMetrics
from moelab.lab.plots import data_uri, img_tag
from moelab.rundir.files import CONFIG_FILE, read_run_config
from moelab.train.compare import COMPARISON_FILE, TRADEOFF_NOTE

logger = logging.getLogger(__name__)

SECTIONS = ("summary", "training-curves", "expert-load", "failure-modes", "specialisation", "coloured-text")

CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;max-width:1200px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{border-bottom:2px solid #444}h2{border-bottom:1px solid #bbb;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}th{background:#f0f0f0}
td:first-child,th:first-child{text-align:left}
pre{background:#f6f6f6;padding:.8em;overflow-x:auto;font-size:.85em;border:1px solid #ddd}
.tok{white-space:pre-wrap;border-radius:2px;padding:0 1px;font-family:ui-monospace,Menlo,Consolas,monospace;
font-size:.85em}
.coloured-text{border:1px solid #ddd;padding:.6em;line-height:1.9;margin-bottom:1em}
.legend .tok{display:inline-block;margin:2px}
.ok{color:#1a7f37}.bad{color:#b42318}.note{color:#666;font-size:.9em}
nav a{margin-right:1em}
"""


@dataclass
class Sources:
    """What the given folders hold, by kind."""

    runs: list[Path] = field(default_factory=list)  # training runs (metrics.jsonl)
    experiments: list[Path] = field(default_factory=list)  # lab experiments (experiment.json)
    analyses: list[Path] = field(default_factory=list)  # analysis.json files
    comparisons: list[Path] = field(default_factory=list)  # comparison.json files (moelab compare)
    skipped: list[str] = field(default_factory=list)  # "folder (why)" for folders not searched


# Folders that hold no runs of their own: a run's TensorBoard log and plots, the data cache.
_NOT_RUNS = frozenset({"tb", "plots", "cache"})


def find_sources(paths: Sequence[str | Path]) -> Sources:
    """Classify each folder (and, when it is none of the kinds, its sub-folders, at any
    depth). Hidden folders (``.git``, an overwritten run moved aside), symlinks to folders
    and the folders in `_NOT_RUNS` are not searched; `Sources.skipped` names them."""
    src = Sources()

    def visit(p: Path, depth: int = 0) -> bool:
        found = False
        if (p / "experiment.json").is_file():
            src.experiments.append(p)
            return True
        if (p / "metrics.jsonl").is_file():
            src.runs.append(p)
            found = True
        if (p / "analysis.json").is_file():
            src.analyses.append(p / "analysis.json")
            found = True
        # A comparison folder is also searched: its runs are its sub-folders.
        if (p / COMPARISON_FILE).is_file():
            src.comparisons.append(p / COMPARISON_FILE)
        if not found and p.is_dir():
            for child in sorted(c for c in p.iterdir() if c.is_dir()):
                if child.name.startswith("."):
                    src.skipped.append(f"{child} (hidden)")
                elif child.is_symlink():
                    src.skipped.append(f"{child} (a symlink, not followed)")
                elif child.name not in _NOT_RUNS:
                    found |= visit(child, depth + 1)
        return found or (p / COMPARISON_FILE).is_file()

    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise DataError(f"{p} does not exist (expected a run, lab experiment or analysis folder)")
        if p.is_file():
            p = p.parent
        if not visit(p):
            raise DataError(
                f"{p} holds no metrics.jsonl, experiment.json, analysis.json or comparison.json (nor do its sub-folders): "
                "nothing to report"
            )
    return src


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{html.escape(title)}</h2>\n{body}\n</section>'


def _empty(what: str) -> str:
    return f'<p class="note">No {what} in the given folders.</p>'


def _run_label(run: Path) -> str:
    return f"{run.parent.name}/{run.name}" if run.parent.name else run.name


def _final_val(run: Path) -> tuple[float | None, int | None]:
    m = RunMetrics.from_run(run)
    val = next((r.get("val_loss") for r in reversed(m.eval) if r.get("val_loss") is not None), None)
    return val, (int(m.train[-1]["step"]) if m.train else None)


def _experiment_html(exp_dir: Path) -> str:
    d = load_experiment(exp_dir)
    ok = d.get("passed")
    status = '<span class="ok">effect shown as claimed</span>' if ok else '<span class="bad">effect NOT shown at this scale</span>'
    parts = [f"<h3>{html.escape(d['experiment'])} <span class='note'>({html.escape(str(exp_dir))})</span>: {status}</h3>"]
    parts.append(f"<pre>{html.escape(verdict_table(d))}</pre>")
    parts.append("<ul>" + "".join(f"<li>{html.escape(v)}</li>" for v in d.get("verdicts", [])) + "</ul>")
    descr = "".join(f"<li><b>{html.escape(n)}</b>: {html.escape(r.get('description', ''))}</li>" for n, r in d["runs"].items())
    parts.append(f"<ul class='note'>{descr}</ul>")
    for name, rel in d.get("plots", {}).items():
        if name.startswith("load_") or name == "loss":
            continue  # per-run load plots are many; the summary plots tell the story
        path = Path(rel)
        if not path.is_absolute() and not path.exists():
            path = exp_dir / "plots" / path.name
        if path.is_file():
            parts.append(img_tag(data_uri(path), f"{d['experiment']} {name}"))
    return "\n".join(parts)


# --------------------------------------------------------------------------- analysis HTML
# Functions of the dict form of an analysis (``analysis.json``): the report embeds them,
# and `write_analysis` saves `analysis_html_fragment` as ``analysis.html``.


def expert_colours(num_experts: int) -> list[str]:
    """One distinct, light background colour per expert (hex), readable under black text.

    Qualitative palettes (tab10/tab20) up to 20 experts; beyond that (fine-grained models,
    64-256 experts) evenly spaced hues, which stay distinct though adjacent ones are close.
    """
    import matplotlib

    colours = []
    for e in range(num_experts):
        if num_experts <= 20:
            cmap = matplotlib.colormaps["tab20" if num_experts > 10 else "tab10"]
            r, g, b, _ = cmap(e)
        else:
            r, g, b, _ = matplotlib.colormaps["hsv"](e / num_experts)
        # Blend towards white so text stays legible (Mixtral's Fig. 8 uses pastel backgrounds).
        r, g, b = (0.45 * c + 0.55 for c in (r, g, b))
        colours.append(f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}")
    return colours


def coloured_text_html(analysis: Mapping[str, Any]) -> str:
    """HTML (inline styles, no scripts) of the samples coloured by first-choice expert.

    `analysis` is the dict form (`SpecializationResult.to_dict()`, i.e. ``analysis.json``).
    """
    colours = expert_colours(int(analysis["num_experts"]))
    legend = " ".join(
        f'<span class="tok" style="background:{c}">expert {e}</span>' for e, c in enumerate(colours)
    )
    parts = [f'<div class="legend">{legend}</div>']
    for s in analysis["samples"]:
        spans = []
        for piece, e in zip(s["pieces"], s["first_expert"], strict=True):
            shown = html.escape(piece).replace("\n", "⏎<br>")
            spans.append(f'<span class="tok" style="background:{colours[e]}" title="expert {e}">{shown}</span>')
        parts.append(
            f'<h4>{html.escape(s["domain"])}, layer {s["layer"]}</h4>'
            f'<div class="coloured-text">{"".join(spans)}</div>'
        )
    return "\n".join(parts)


def consistency_table_html(analysis: Mapping[str, Any]) -> str:
    rows = []
    for layer, ls in analysis["layers"].items():
        for d, c in ls["consistency"].items():
            rows.append(
                f"<tr><td>{layer}</td><td>{html.escape(d)}</td>"
                f"<td>{c['first_choice_same']:.3f}</td><td>{c['random_first_choice']:.3f}</td>"
                f"<td>{c['topk_overlap']:.3f}</td><td>{c['random_topk_overlap']:.3f}</td></tr>"
            )
    return (
        "<table><tr><th>layer</th><th>domain</th><th>same 1st choice</th><th>random</th>"
        f"<th>top-{analysis['top_k']} overlap</th><th>random</th></tr>" + "".join(rows) + "</table>"
    )


def top_tokens_html(analysis: Mapping[str, Any], layer: str) -> str:
    rows = []
    for e, ts in enumerate(analysis["layers"][layer]["top_tokens"]):
        cells = ", ".join(
            f"<code>{html.escape(repr(t['text'])[1:-1])}</code> {t['fraction']:.0%} (n={t['count']})" for t in ts[:6]
        )
        rows.append(f"<tr><td>{e}</td><td>{cells}</td></tr>")
    return ("<table><tr><th>expert</th><th>tokens it takes most (share of the token's occurrences)</th></tr>"
            f"{''.join(rows)}</table>")


def intro_html(analysis: Mapping[str, Any]) -> str:
    E = int(analysis["num_experts"])
    return (
        f"<p>{E} experts, top-{analysis['top_k']}; held-out tokens per domain: "
        + ", ".join(f"{html.escape(d)} {n}" for d, n in analysis["tokens_per_domain"].items())
        + f". Uniform routing gives each expert 1/E = {1 / E:.3f} of a domain's assignments "
        "and a specialisation score of 1.</p>"
    )


def analysis_html_fragment(analysis: Mapping[str, Any], images: Mapping[str, str]) -> str:
    """The analysis as an HTML fragment (no <html>/<head>); `images` maps name -> data URI."""
    parts = ['<div class="moelab-analysis">', intro_html(analysis)]
    parts.append("<h3>Domain x expert distribution (rows sum to 1)</h3>")
    if "heatmap" in images:
        parts.append(img_tag(images["heatmap"], "domain x expert heatmaps"))
    parts.append("<h3>Routing consistency of consecutive tokens</h3>")
    parts.append(consistency_table_html(analysis))
    if "coactivation" in images:
        parts.append("<h3>Expert co-activation</h3>")
        parts.append(img_tag(images["coactivation"], "expert co-activation"))
    last = list(analysis["layers"])[-1]
    parts.append(f"<h3>Vocabulary specialisation (layer {last})</h3>")
    parts.append(top_tokens_html(analysis, last))
    parts.append("<h3>Text coloured by first-choice expert</h3>")
    parts.append(coloured_text_html(analysis))
    parts.append("</div>")
    return "\n".join(parts)


# --------------------------------------------------------------------------- comparison HTML


def comparison_table_html(comparison: Mapping[str, Any]) -> str:
    """The trade-off table of one `moelab compare` result (the dict of ``comparison.json``):
    per model its size, compute, val loss, steps to the dense model's final val loss, and
    quality per training TFLOP beside quality per MiB of weights (`moelab.train.compare`)."""
    roles = comparison["roles"]
    head = ["model", "role", "total params", "active params", "train GFLOP/tok", "val loss",
            "steps to dense loss", "nats/TFLOP", "nats/MiB"]

    def num(x: Any, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    rows = []
    for role, name in roles.items():
        m = comparison["models"][name]
        ratio = m.get("steps_to_dense_loss_ratio")
        cells = [name, role, f"{m['total_params'] / 1e6:.2f}M", f"{m['active_params'] / 1e6:.2f}M",
                 f"{m['train_flops_per_token'] / 1e9:.4f}", num(m.get("val_loss"), ".4f"),
                 "-" if role == "dense" else ("never" if ratio is None else f"{ratio:.2f}x"),
                 num(m.get("quality_per_tflop"), ".4f"), num(m.get("quality_per_mib"), ".4f")]
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>" + "".join(rows)
            + f"</table><p class='note'>{html.escape(TRADEOFF_NOTE)}</p>")


# --------------------------------------------------------------------------- the report


def build_report(
    paths: Sequence[str | Path],
    out_path: str | Path,
    *,
    title: str = "moelab report",
    summary_blocks: Sequence[tuple[str, str]] = (),
) -> Path:
    """Write the HTML report for `paths` to `out_path` and return its path.

    `summary_blocks` are ``(heading, preformatted text)`` pairs shown in the summary
    (the demo puts the `moelab size` table and the MoE-vs-dense comparison there).
    Training-run plots are drawn afresh from each run's ``metrics.jsonl`` into a private
    temporary folder, embedded, and the folder removed; nothing beside `out_path` is touched.
    """
    src = find_sources(paths)
    out_path = Path(out_path)
    logger.info("report: %d run(s), %d experiment(s), %d analysis file(s), %d comparison(s)", len(src.runs),
                len(src.experiments), len(src.analyses), len(src.comparisons))
    if src.skipped:
        logger.info("report: skipped %s", "; ".join(src.skipped))

    # Summary
    summary = [f"<p>Generated {html.escape(time.strftime('%Y-%m-%d %H:%M'))} from "
               + ", ".join(f"<code>{html.escape(str(p))}</code>" for p in paths) + ".</p>"]
    for heading, text in summary_blocks:
        summary.append(f"<h3>{html.escape(heading)}</h3><pre>{html.escape(text)}</pre>")
    for c_path in src.comparisons:
        c = _read_json(c_path)
        if not c or "roles" not in c or "models" not in c:
            logger.warning("%s is not a moelab comparison; skipped", c_path)
            continue
        summary.append(f"<h3>MoE vs dense: the trade-off <span class='note'>({html.escape(str(c_path.parent))})"
                       f"</span></h3>" + comparison_table_html(c))
    if src.runs:
        rows = []
        for run in src.runs:
            val, steps = _final_val(run)
            model = read_run_config(run)["model"] if (run / CONFIG_FILE).is_file() else {}
            moe = model.get("moe")
            kind = f"MoE {moe['num_experts']}x top-{moe['top_k']}" if moe else "dense"
            rows.append(f"<tr><td>{html.escape(_run_label(run))}</td><td>{kind}</td><td>{steps if steps is not None else '-'}</td>"
                        f"<td>{'-' if val is None else f'{val:.4f}'}</td></tr>")
        summary.append("<table><tr><th>run</th><th>model</th><th>steps</th><th>final val loss</th></tr>"
                       + "".join(rows) + "</table>")
    if src.experiments:
        items = []
        for e in src.experiments:
            d = load_experiment(e)
            mark = "<span class='ok'>shown</span>" if d.get("passed") else "<span class='bad'>not shown</span>"
            items.append(f"<li>failure mode <b>{html.escape(d['experiment'])}</b>: {mark}</li>")
        summary.append("<ul>" + "".join(items) + "</ul>")

    # Training curves and expert load
    curves, loads = _training_html(src.runs)
    # Failure modes
    fm = [_experiment_html(e) for e in src.experiments]
    # Specialisation
    spec, text = [], []
    for a_path in src.analyses:
        a = _read_json(a_path)
        if not a or a.get("format") != "moelab-analysis":
            logger.warning("%s is not a moelab analysis; skipped", a_path)
            continue
        label = html.escape(str(a_path.parent))
        spec.append(f"<h3>{label}</h3>" + intro_html(a))
        for key in ("heatmap", "coactivation"):
            rel = (a.get("files") or {}).get(key)
            if rel and (a_path.parent / rel).is_file():
                spec.append(img_tag(data_uri(a_path.parent / rel), key))
        spec.append("<h4>Routing consistency (consecutive tokens)</h4>" + consistency_table_html(a))
        last = list(a["layers"])[-1]
        spec.append(f"<h4>Vocabulary specialisation, layer {last}</h4>" + top_tokens_html(a, last))
        text.append(f"<h3>{label}</h3>" + coloured_text_html(a))

    nav = "".join(f'<a href="#{s}">{s.replace("-", " ")}</a>' for s in SECTIONS)
    body = [
        f"<h1>{html.escape(title)}</h1><nav>{nav}</nav>",
        _section("summary", "Summary", "\n".join(summary)),
        _section("training-curves", "Training curves", "\n".join(curves) or _empty("training runs")),
        _section("expert-load", "Expert load over training", "\n".join(loads) or _empty("MoE training runs")),
        _section("failure-modes", "Failure-mode verdicts", "\n".join(fm) or _empty("lab experiments")),
        _section("specialisation", "Specialisation heatmaps", "\n".join(spec) or _empty("specialisation analyses")),
        _section("coloured-text", "Text coloured by first-choice expert", "\n".join(text) or _empty("specialisation analyses")),
    ]
    doc = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body>\n"
        + "\n".join(body) + "\n</body></html>\n"
    )
    atomic_write_text(out_path, doc)
    return out_path


def _training_html(runs: Sequence[Path]) -> tuple[list[str], list[str]]:
    """(training-curve, expert-load) HTML of `runs`, plots drawn in a private temporary
    folder that is removed whatever happens (images are embedded, so nothing is kept)."""
    curves: list[str] = []
    loads: list[str] = []
    if not runs:
        return curves, loads
    metrics = {_run_label(r): RunMetrics.from_run(r) for r in runs}
    with tempfile.TemporaryDirectory(prefix="moelab-report-") as tmp:
        tmp_dir = Path(tmp)
        curves.append(img_tag(data_uri(plots.plot_training_curves(metrics, tmp_dir / "loss.png")), "training curves"))
        for label, m in metrics.items():
            if m.layers:
                p = plots.plot_expert_load(m, tmp_dir / f"load_{label.replace('/', '_')}.png", title=f"{label}: expert load")
                loads.append(f"<h3>{html.escape(label)}</h3>" + img_tag(data_uri(p), f"{label} expert load"))
    return curves, loads


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
