"""PNG plots of runs, lab experiments and specialisation analyses (matplotlib, no display).

Uses matplotlib's object API (`Figure` + the Agg canvas), never `pyplot`, so no global
figure state or GUI backend is touched and plotting is safe from any thread. Every plot
is a function of data on disk (`metrics.jsonl`, `analysis.json`), so it can be redrawn:
run metrics (`RunMetrics`) and plain arrays, never the analysis objects themselves.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from moelab.errors import DataError
from moelab.io import atomic_path
from moelab.lab.metrics import RunMetrics, num

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- figure helpers


def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def data_uri(path: str | Path) -> str:
    """A PNG file as a ``data:`` URI (for self-contained HTML)."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def img_tag(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{alt}" style="max-width:100%">'


def _grid(n: int, max_cols: int = 4) -> tuple[int, int]:
    cols = min(n, max_cols)
    return (n + cols - 1) // cols, cols


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average ignoring NaNs (per-step routing stats are noisy)."""
    if window <= 1 or len(y) == 0:
        return y
    out = np.empty_like(y, dtype=np.float64)
    for i in range(len(y)):
        seg = y[max(0, i - window + 1): i + 1]
        seg = seg[np.isfinite(seg)]
        out[i] = seg.mean() if seg.size else np.nan
    return out


# --------------------------------------------------------------------------- training runs


def plot_training_curves(runs: Mapping[str, RunMetrics], path: str | Path, *, title: str = "") -> Path:
    """Train loss (smoothed) and validation loss per run, on one axis."""
    fig = _figure(7, 4)
    ax = fig.add_subplot()
    for i, (name, m) in enumerate(runs.items()):
        colour = f"C{i % 10}"
        steps = m.steps()
        if len(steps):
            loss = m.series("lm_loss")
            if not np.isfinite(loss).any():
                loss = m.series("loss")
            ax.plot(steps, _smooth(loss, max(1, len(steps) // 50)), color=colour, lw=1.2, label=f"{name} train")
        if m.eval:
            ax.plot([r["step"] for r in m.eval], [num(r.get("val_loss")) for r in m.eval], "o--",
                    color=colour, ms=4, label=f"{name} val")
    ax.set_xlabel("step")
    ax.set_ylabel("LM loss (nats/token)")
    ax.set_title(title or "training curves")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_expert_load(metrics: RunMetrics, path: str | Path, *, title: str = "") -> Path:
    """Per MoE layer: each expert's share of routed assignments over training (stacked)."""
    layers = metrics.layers
    if not layers:
        raise DataError("no MoE routing stats in metrics (a dense run?): nothing to plot for expert load")
    rows, cols = _grid(len(layers))
    fig = _figure(3.6 * cols, 2.8 * rows)
    steps = metrics.steps()
    window = max(1, len(steps) // 40)
    for i, layer in enumerate(layers):
        ax = fig.add_subplot(rows, cols, i + 1)
        load = metrics.load_matrix(layer)
        share = load / np.clip(load.sum(1, keepdims=True), 1, None)
        share = np.stack([_smooth(share[:, e], window) for e in range(share.shape[1])], axis=0)
        E = share.shape[0]
        ax.stackplot(steps, share, colors=[f"C{e % 10}" for e in range(E)],
                     labels=[f"e{e}" for e in range(E)], alpha=0.85)
        for k in range(1, E):
            ax.axhline(k / E, color="white", lw=0.4, alpha=0.6)
        ax.set_ylim(0, 1)
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if i == 0:
            ax.set_ylabel("share of assignments", fontsize=8)
    fig.legend(*fig.axes[0].get_legend_handles_labels(), loc="outside right", fontsize=7)
    fig.suptitle(title or "expert load over training (white lines: uniform)", fontsize=10)
    return _save(fig, path)


def plot_lab_metric(
    runs: Mapping[str, RunMetrics],
    key: str,
    path: str | Path,
    *,
    reduce: str = "max",
    ylabel: str = "",
    hline: float | None = None,
    hline_label: str = "",
    log: bool = False,
    title: str = "",
    per_layer: bool = False,
) -> Path:
    """A `RoutingStats` field over training for several runs.

    Per step, the layers are reduced with `reduce` ("max", "mean" or "sum"), or, with
    `per_layer`, each layer gets its own panel. A top-level train-row key (like "loss")
    is plotted as is.
    """
    fns = {"max": np.nanmax, "mean": np.nanmean, "sum": np.nansum}
    layers = sorted({la for m in runs.values() for la in m.layers}, key=int)
    panels = layers if (per_layer and layers) else [None]
    rows, cols = _grid(len(panels))
    fig = _figure(max(6.5, 3.6 * cols), 3.6 * rows if len(panels) > 1 else 3.8)
    for p, layer in enumerate(panels):
        ax = fig.add_subplot(rows, cols, p + 1)
        for i, (name, m) in enumerate(runs.items()):
            steps = m.steps()
            if not len(steps):
                continue
            if m.layers and key not in m.train[0]:
                if layer is not None:
                    y = m.layer_series(key, layer)
                else:
                    stack = np.stack([m.layer_series(key, la) for la in m.layers])
                    with np.errstate(all="ignore"), _quiet():
                        y = fns[reduce](stack, axis=0)
            else:
                y = m.series(key)
            y = np.where(np.isfinite(y), y, np.nan)
            ax.plot(steps, _smooth(y, max(1, len(steps) // 60)), color=f"C{i % 10}", lw=1.3, label=name)
        if hline is not None:
            ax.axhline(hline, color="grey", ls=":", lw=1, label=hline_label or None)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel or key)
        ax.grid(alpha=0.3)
        if layer is not None:
            ax.set_title(f"layer {layer}", fontsize=9)
        if p == 0:
            ax.legend(fontsize=8)
    fig.suptitle(title or key, fontsize=10)
    return _save(fig, path)


class _quiet:
    """Silence numpy's 'All-NaN slice' warnings inside a block."""

    def __enter__(self) -> None:
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc: object) -> None:
        self._cm.__exit__(*exc)


def plot_bars(values: Mapping[str, float], path: str | Path, *, ylabel: str, title: str,
              hline: float | None = None, hline_label: str = "") -> Path:
    """One bar per run (final values of a verdict table)."""
    fig = _figure(6.5, 3.4)
    ax = fig.add_subplot()
    names = list(values)
    ys = [values[n] if values[n] is not None else np.nan for n in names]
    ax.bar(range(len(names)), ys, color=[f"C{i % 10}" for i in range(len(names))])
    ax.set_xticks(range(len(names)), names, fontsize=8)
    if hline is not None:
        ax.axhline(hline, color="grey", ls=":", lw=1, label=hline_label or None)
        if hline_label:
            ax.legend(fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_tradeoff(points: Mapping[str, tuple[float, float]], path: str | Path, *, xlabel: str, ylabel: str,
                  title: str, vline: float | None = None, vline_label: str = "") -> Path:
    """One labelled point per run, e.g. load balance (x) against val loss (y)."""
    fig = _figure(6.5, 4)
    ax = fig.add_subplot()
    for i, (name, (x, y)) in enumerate(points.items()):
        ax.scatter([x], [y], color=f"C{i % 10}", s=30)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if vline is not None:
        ax.axvline(vline, color="grey", ls=":", lw=1, label=vline_label or None)
        if vline_label:
            ax.legend(fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    return _save(fig, path)


# --------------------------------------------------------------------------- specialisation


def plot_domain_heatmaps(share_by_layer: Mapping[int, np.ndarray], domains: Sequence[str], path: str | Path) -> Path:
    """Per MoE layer, a domains x experts heatmap of assignment shares.

    `share_by_layer` maps a layer index to its ``[D, E]`` share matrix (rows sum to 1),
    rows in the order of `domains`.
    """
    mats = {layer: np.asarray(m, dtype=np.float64) for layer, m in share_by_layer.items()}
    n = len(mats)
    rows, cols = _grid(n, max_cols=2)
    D = len(domains)
    E = next(iter(mats.values())).shape[1]
    fig = _figure(max(3.2, 0.42 * E + 1.6) * cols, (0.38 * D + 1.3) * rows)
    vmax = max(float(m.max()) for m in mats.values())
    im = None
    for i, (layer, mat) in enumerate(mats.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        im = ax.imshow(mat, cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
        ax.set_yticks(range(D), list(domains), fontsize=8)
        ax.set_xticks(range(E), [str(e) for e in range(E)], fontsize=7)
        ax.set_xlabel("expert", fontsize=8)
        ax.set_title(f"layer {layer}", fontsize=9)
        if E <= 16:
            for d in range(D):
                for e in range(E):
                    ax.text(e, d, f"{mat[d, e]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if mat[d, e] < 0.6 * vmax else "black")
    if im is not None:
        fig.colorbar(im, ax=fig.axes, shrink=0.8, label="share of domain's assignments")
    fig.suptitle(f"domain x expert routing (uniform = 1/{E} = {1 / E:.3f})", fontsize=10)
    return _save(fig, path)


def plot_coactivation(coactivation_by_layer: Mapping[int, np.ndarray], path: str | Path) -> Path:
    """Per MoE layer, the ``[E, E]`` co-activation matrix (diagonal hidden: it is the load)."""
    n = len(coactivation_by_layer)
    rows, cols = _grid(n)
    fig = _figure(3.3 * cols, 3.0 * rows)
    im = None
    for i, (layer, co) in enumerate(coactivation_by_layer.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        mat = np.array(co, dtype=np.float64)  # a copy: the diagonal is blanked
        E = mat.shape[0]
        np.fill_diagonal(mat, np.nan)
        im = ax.imshow(mat, cmap="magma", vmin=0)
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xticks(range(E), [str(e) for e in range(E)], fontsize=6)
        ax.set_yticks(range(E), [str(e) for e in range(E)], fontsize=6)
    if im is not None:
        fig.colorbar(im, ax=fig.axes, shrink=0.8, label="fraction of tokens routed to both")
    fig.suptitle("expert co-activation", fontsize=10)
    return _save(fig, path)


def plot_run(run_dir: str | Path, *, names: Sequence[str] = ("loss", "load")) -> dict[str, Path]:
    """Redraw a run's standard plots into ``RUN_DIR/plots/`` from its metrics."""
    run_dir = Path(run_dir)
    m = RunMetrics.from_run(run_dir)
    out: dict[str, Path] = {}
    if "loss" in names:
        out["loss"] = plot_training_curves({run_dir.name: m}, run_dir / "plots" / "loss.png", title=run_dir.name)
    if "load" in names and m.layers:
        out["load"] = plot_expert_load(m, run_dir / "plots" / "expert_load.png", title=f"{run_dir.name}: expert load")
    return out


def plot_heatmap(matrix: np.ndarray, path: str | Path, *, xlabel: str, ylabel: str, row_labels: list[str],
                 title: str) -> Path:
    """A rows x columns heatmap with a colour bar (e.g. MoE layers x experts)."""
    rows, cols = matrix.shape
    fig = _figure(1.2 + 0.45 * cols, 1.0 + 0.4 * rows)
    ax = fig.subplots()
    im = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_yticks(range(rows), row_labels)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)
    return _save(fig, path)
