"""``capacity``: capacity factors below 1, 1, above 1 and dropless.

Each expert takes at most ``ceil(cf * T * K / E)`` assignments per call; the rest are
dropped (the token skips that expert). Measured: the fraction of (token, expert)
assignments dropped per layer, and what dropping costs in validation loss.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from moelab.lab.config import LabConfig
from moelab.lab.experiments.base import Experiment, MetricPlot, RunSpec, Verdict
from moelab.lab.run_summary import RunSummary


def runs(cfg: LabConfig, vocab_size: int) -> list[RunSpec]:
    """One run per capacity factor, smallest first, dropless (None) last."""
    E = cfg.num_experts
    out = []
    for cf in sorted(cfg.capacity_factors, key=lambda c: math.inf if c is None else c):
        name = "dropless" if cf is None else f"cf-{cf:g}"
        if cf is not None and cf < 1:
            name = "broken-" + name
        desc = "dropless (every routed token computed)" if cf is None else (
            f"capacity factor {cf:g}: each expert takes <= ceil({cf:g} x T x {cfg.top_k} / {E}) assignments")
        out.append(RunSpec(name, desc, cfg.model_config(vocab_size, capacity_factor=cf), cfg.lr, None,
                           {"capacity_factor": cf}))
    return out


def verdict(runs: Mapping[str, RunSummary], E: int) -> Verdict:
    """Below 1 something is dropped, dropless drops nothing, and drops fall as cf grows."""
    out: list[str] = []
    ok = True
    base = next((r for r in runs.values() if r.name == "dropless"), None)
    for r in runs.values():
        cost = ""
        if base is not None and base.val_loss is not None and r.val_loss is not None and r is not base:
            cost = f", val loss {r.val_loss - base.val_loss:+.3f} vs dropless"
        out.append(f"{r.name}: {r.dropped_fraction or 0:.1%} of assignments dropped{cost}")
        cf = r.settings.get("capacity_factor")
        if cf is not None and cf < 1:
            ok &= (r.dropped_fraction or 0) > 0
        if cf is None:
            ok &= (r.dropped_fraction or 0) == 0
    ordered = [r for r in runs.values() if r.settings.get("capacity_factor") is not None]
    drops = [r.dropped_fraction or 0 for r in ordered]
    mono = all(a >= b - 1e-9 for a, b in zip(drops, drops[1:], strict=False))
    out.append(f"dropped fraction falls as capacity grows: {'yes' if mono else 'NO'}")
    ok &= mono
    return Verdict(out, ok)


EXPERIMENT = Experiment(
    name="capacity",
    runs=runs,
    verdict=verdict,
    reads=("dropped_fraction", "val_loss", "settings"),
    plots=(
        MetricPlot(name="dropped", key="dropped_fraction", file="dropped_fraction.png", reduce="mean",
                   per_layer=True, ylabel="dropped fraction",
                   title="capacity: fraction of assignments dropped, per layer"),
    ),
)
