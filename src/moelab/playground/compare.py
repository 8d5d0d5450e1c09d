"""The Compare panel: finished training runs side by side (the MoE-vs-dense table and
curves), from their run folders.

Every run directory under the served folders qualifies: Break runs, `moelab train` and
`moelab compare` outputs. Parameters come from `moelab.accounting` (the run's config.json,
as `moelab size RUN` reads it), losses from ``metrics.jsonl`` (`moelab.lab.metrics.RunMetrics`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from moelab.accounting.moelab_config import spec_from_moelab_run
from moelab.accounting.params import count_params
from moelab.accounting.report import fmt_params
from moelab.errors import MoelabError
from moelab.lab.metrics import RunMetrics
from moelab.rundir.files import MODEL_FILE, is_run_dir
from moelab.train.metrics import METRICS_FILE

MAX_POINTS = 200  # per curve: enough for a 1280 px chart, small enough to send often


def _thin(points: list[list[float]]) -> list[list[float]]:
    """Every n-th point (and the last), at most MAX_POINTS."""
    if len(points) <= MAX_POINTS:
        return points
    step = math.ceil(len(points) / MAX_POINTS)
    return points[::step] + ([points[-1]] if (len(points) - 1) % step else [])


def _finite(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and math.isfinite(v) else None


def run_summary(run_dir: Path, root: Path) -> dict[str, Any] | None:
    """One row of the table and its curves; None for a folder that is not a finished run."""
    if not (run_dir / METRICS_FILE).is_file() or not is_run_dir(run_dir):
        return None
    try:
        m = RunMetrics.from_run(run_dir)
        spec, _ = spec_from_moelab_run(run_dir)
    except (MoelabError, ValueError, OSError):
        return None
    if not m.train:
        return None
    counts = count_params(spec)
    moe = bool(counts.moe_groups)
    last_eval = m.eval[-1] if m.eval else {}
    shares = [max(v.get("busiest_expert_share", 0.0) for v in (m.train[-1].get("layers") or {}).values())] \
        if m.train[-1].get("layers") else []
    return {
        "name": str(run_dir.relative_to(root)) if run_dir.is_relative_to(root) else run_dir.name,
        "path": str(run_dir),
        "kind": "MoE" if moe else "dense",
        "finished": (run_dir / MODEL_FILE).is_file(),
        "total_params": counts.total, "active_params": counts.active,
        "total": fmt_params(counts.total), "active": fmt_params(counts.active),
        "steps": int(m.train[-1]["step"]),
        "train_loss": _finite(m.train[-1].get("loss")),
        "val_loss": _finite(last_eval.get("val_loss")),
        "busiest_expert_share": shares[0] if shares else None,
        "train_curve": _thin([[r["step"], v] for r in m.train if (v := _finite(r.get("loss"))) is not None]),
        "val_curve": [[r["step"], v] for r in m.eval if (v := _finite(r.get("val_loss"))) is not None],
    }


def finished_runs(roots: tuple[Path, ...], depth: int = 3) -> list[dict[str, Any]]:
    """Every run under `roots` (`depth` levels down), runs folder first."""
    out: list[dict[str, Any]] = []
    seen: set[Path] = set()
    for root in roots:
        for d in [root, *(p for n in range(1, depth + 1) for p in sorted(root.glob("/".join(["*"] * n))))]:
            if d in seen or not d.is_dir() or any(part.startswith(".") for part in d.relative_to(root).parts):
                continue
            seen.add(d)
            row = run_summary(d, root)
            if row is not None:
                out.append(row)
    return out


def moe_vs_dense(moe: dict[str, Any], dense: dict[str, Any]) -> dict[str, Any]:
    """The MoE-vs-dense figure of `moelab compare` for two runs' summaries (`run_summary`):
    the (interpolated) step at which the MoE's validation curve reaches the dense run's
    final validation loss (`moelab.train.compare.steps_to_reach`), and that over the dense
    run's steps (< 1: the MoE learns faster per step)."""
    from moelab.train.compare import steps_to_reach

    target = dense["val_loss"]
    history = [{"step": s, "val_loss": v} for s, v in moe["val_curve"]]
    steps = steps_to_reach(history, target) if target is not None else None
    ratio = steps / dense["steps"] if steps is not None and dense["steps"] else None
    if target is None:
        sentence = f"{dense['name']} has no validation loss to reach"
    elif steps is None:
        sentence = f"{moe['name']} did not reach {dense['name']}'s final val loss ({target:.4f}) within {moe['steps']} steps"
    else:
        sentence = (f"{moe['name']} reaches {dense['name']}'s final val loss ({target:.4f}) at step {steps:.0f} "
                    f"of {dense['steps']}: {ratio:.2f}x the steps")
    return {"moe": moe["name"], "dense": dense["name"], "target_val_loss": target, "moe_steps_to_dense_loss": steps,
            "moe_steps_to_dense_loss_ratio": ratio, "sentence": sentence}
