"""`RunSummary`: the final figures of one lab run, computed from its ``metrics.jsonl``
rows (`summarize_run`), and the loss-spike count (`count_spikes`) they include.

These are what each experiment's verdict reads; they do not depend on the experiment.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moelab.lab.metrics import RunMetrics, num


@dataclass
class RunSummary:
    """Final figures of one run (null/None where not applicable), plus per-layer detail.

    Routing figures are averaged over the last 10% of training steps (at least 5), since
    one step's load is noisy; ``dead_experts`` counts, over all MoE layers, experts that
    got no assignment in that whole window; ``max_router_logit`` is the largest |logit|
    over layers in that window and ``peak_router_logit`` the largest over the whole run.
    """

    name: str
    description: str
    run_dir: str
    steps_done: int
    stopped_reason: str | None
    busiest_expert_share: float | None
    load_cv: float | None
    dead_experts: int | None
    dropped_fraction: float | None
    max_router_logit: float | None
    peak_router_logit: float | None
    initial_router_logit: float | None
    loss_spikes: int
    nan_steps: int
    val_loss: float | None
    final_train_loss: float | None
    per_layer: dict[str, dict[str, Any]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    # instability: share of (token, MoE layer) pairs of the validation batches whose top-k
    # set a bf16 router would choose differently from a float32 one (`bf16_routing_flips`)
    bf16_routing_flips: float | None = None
    # (step, val loss) of every evaluation: where two runs' curves cross (`crossing_step`)
    val_curve: list[list[float]] = field(default_factory=list)
    # collapse: the trained routers on held-out tokens (`moelab.lab.imbalance.RoutingCosts`)
    drop_capacity_factor: float | None = None
    dropped_at_capacity: float | None = None  # share of assignments dropped at that capacity factor
    ep_step_factor: dict[str, float] | None = None  # EP size -> max / mean device load
    effective_experts: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _finite(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def count_spikes(loss: np.ndarray, factor: float, window: int = 20, warmup: int = 10) -> int:
    """Steps whose loss exceeds `factor` x the median of the previous `window` losses.

    Non-finite losses count as spikes. The first `warmup` steps are skipped (the loss
    falls fast there, so a median of few points is not a baseline).
    """
    spikes = 0
    for i in range(len(loss)):
        if not math.isfinite(loss[i]):
            spikes += 1
            continue
        if i < warmup:
            continue
        prev = loss[max(0, i - window): i]
        prev = prev[np.isfinite(prev)]
        if prev.size and loss[i] > factor * float(np.median(prev)):
            spikes += 1
    return spikes


def crossing_step(curve_a: list[list[float]], curve_b: list[list[float]]) -> int | None:
    """The first evaluation step from which run a's val loss stays below run b's.

    Curves are ``(step, val loss)`` pairs; only the steps both evaluated are compared
    (same eval interval: all of them). ``None`` when a is not below b at the last common
    step (it has not passed, or passed and fell back), or there is no common step.
    """
    b = {int(s): v for s, v in curve_b}
    common = [(int(s), v, b[int(s)]) for s, v in curve_a if int(s) in b]
    cross = None
    for step, va, vb in common:
        if va < vb:
            cross = step if cross is None else cross
        else:
            cross = None
    return cross


def summarize_run(
    name: str,
    metrics: RunMetrics,
    *,
    run_dir: str | Path,
    description: str = "",
    val_loss: float | None = None,
    nan_steps: int | None = None,
    stopped_reason: str | None = None,
    steps_done: int | None = None,
    spike_factor: float = 1.5,
    settings: dict[str, Any] | None = None,
) -> RunSummary:
    """Final routing figures of one run from its metrics rows (see `RunSummary`)."""
    n = len(metrics.train)
    window = max(5, n // 10)
    tail = metrics.train[-window:]
    loss = metrics.series("loss")
    per_layer: dict[str, dict[str, Any]] = {}
    for layer in metrics.layers:
        rows = [(r.get("layers") or {}).get(layer) for r in tail]
        rows = [r for r in rows if r]
        if not rows:
            continue
        load = np.sum([r["tokens_per_expert"] for r in rows], axis=0)
        logits = [r.get("max_router_logit") for r in rows]
        per_layer[layer] = {
            "busiest_expert_share": float(np.mean([r["busiest_expert_share"] for r in rows])),
            "load_cv": float(np.mean([r["load_cv"] for r in rows])),
            "dead_experts": int((load == 0).sum()),
            "dropped_fraction": float(np.mean([r.get("dropped_fraction", 0.0) for r in rows])),
            "max_router_logit": _finite(max((v for v in logits if v is not None), default=float("nan"))),
            "load_share": (load / max(load.sum(), 1)).tolist(),
        }
    peak = [num((r.get("layers") or {}).get(la, {}).get("max_router_logit"))
            for r in metrics.train for la in (r.get("layers") or {})]
    peak = [p for p in peak if math.isfinite(p)]
    has_moe = bool(per_layer)

    def agg(key: str, fn: Callable[[list[float]], float]) -> float | None:
        vals = [v[key] for v in per_layer.values() if v[key] is not None]
        return _finite(fn(vals)) if vals else None

    if val_loss is None and metrics.eval and stopped_reason is None:
        val_loss = metrics.eval[-1].get("val_loss")
    if nan_steps is None:
        nan_steps = int((~np.isfinite(loss)).sum())
    finite_loss = loss[np.isfinite(loss)]
    return RunSummary(
        name=name,
        description=description,
        run_dir=str(run_dir),
        steps_done=steps_done if steps_done is not None else (int(metrics.train[-1]["step"]) if n else 0),
        stopped_reason=stopped_reason,
        busiest_expert_share=agg("busiest_expert_share", lambda v: float(np.mean(v))) if has_moe else None,
        load_cv=agg("load_cv", lambda v: float(np.mean(v))) if has_moe else None,
        dead_experts=sum(v["dead_experts"] for v in per_layer.values()) if has_moe else None,
        dropped_fraction=agg("dropped_fraction", lambda v: float(np.mean(v))) if has_moe else None,
        max_router_logit=agg("max_router_logit", max) if has_moe else None,
        peak_router_logit=max(peak) if peak else None,
        initial_router_logit=_finite(max((num(v.get("max_router_logit"))
                                          for v in (metrics.train[0].get("layers") or {}).values()),
                                         default=float("nan"))) if n else None,
        loss_spikes=count_spikes(loss, spike_factor),
        nan_steps=int(nan_steps),
        val_loss=_finite(val_loss) if val_loss is not None else None,
        final_train_loss=float(np.mean(finite_loss[-window:])) if finite_loss.size else None,
        per_layer=per_layer,
        settings=settings or {},
        val_curve=[[int(r["step"]), float(r["val_loss"])] for r in metrics.eval
                   if r.get("val_loss") is not None and math.isfinite(r["val_loss"])],
    )
