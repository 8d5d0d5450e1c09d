"""Failure modes of MoE training, each as a small paired experiment (broken vs cured).

Every experiment trains a few runs of the same small model on the same data with the
same seed, differing only in the setting under test, then reads the per-step routing
telemetry back from each run's ``metrics.jsonl`` and gives a verdict:

* ``collapse`` — routing collapse. Trained LMs' hidden states share a large common
  component (anisotropy), so a router row aligned with it prefers some experts for
  *every* token. With no load-balancing loss the favoured experts get all the gradient
  and improve, the starved ones never get picked again (with renormalised top-k weights a
  dead expert's logit gets no gradient at all): the rich get richer (Shazeer et al. 2017,
  §4). We build that state explicitly (`skew_router`) and train from it: broken = no aux
  loss; cures = the aux loss (Switch, eq. 4) and DeepSeek-V3's aux-loss-free bias balancing.
* ``instability`` — router logits grow until the loss spikes or turns NaN: a large router
  init, a high learning rate, un-normalised top-k weights (a sharper router gets a larger
  weight, so the gradient keeps pushing logits up) and no z-loss. Cure: the router z-loss
  (ST-MoE, Zoph et al. 2022, eq. 5). The other ST-MoE cure is a float32 router: a third
  run computes the router in bf16 (``MoEConfig.router_dtype``), and every run reports
  how often a bf16 router would pick a different top-k set than the float32 one on the
  same weights and inputs (`bf16_routing_flips`): the precision loss that ST-MoE's
  "selective precision" avoids, which grows with the logits.
* ``capacity`` — capacity factors 0.5 / 1.0 / 1.25 / dropless: the fraction of
  (token, expert) assignments dropped per layer, and what dropping costs in validation loss.

`run_experiment` returns an `ExperimentResult`; it writes ``experiment.json`` and the PNG
plots in the experiment folder, and every run keeps its own run directory (the shared
run-directory contract), so the plots can be redrawn from disk.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moelab.data import val_batches
from moelab.errors import ConfigError, DataError
from moelab.io import atomic_write_json
from moelab.lab import plots
from moelab.lab.metrics import RunMetrics
from moelab.model import ModelConfig, Transformer
from moelab.moe import MoEConfig, NonFiniteRouterError

logger = logging.getLogger(__name__)

EXPERIMENTS = ("collapse", "instability", "capacity")
RESULT_FORMAT = "moelab-lab"


@dataclass(frozen=True, kw_only=True)
class LabConfig:
    """Scale of a lab experiment: the small model and the short training run.

    The defaults are sized to show each effect in a minute or two per run on 2 CPU cores.
    """

    steps: int = 150
    batch_size: int = 16
    seq_len: int = 64
    lr: float = 3e-3
    seed: int = 0
    eval_every: int = 0  # 0: evaluate at step 0 and the end only
    eval_batches: int = 2  # validation batches per domain
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    num_experts: int = 8
    top_k: int = 2
    d_expert: int = 128
    # collapse
    skew_strength: float = 3.0  # router logit advantage of the favoured experts at init
    aux_loss_coef: float = 0.01  # the cure; also the setting of the instability/capacity runs
    bias_update_rate: float = 0.01  # aux-loss-free balancing, sized for a short run
    # instability
    unstable_lr: float = 3e-2
    unstable_router_std: float = 0.5
    z_loss_coef: float = 1e-2
    spike_factor: float = 1.5  # a loss > factor x running median of the last steps is a spike
    # capacity
    capacity_factors: tuple[float | None, ...] = (0.5, 1.0, 1.25, None)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_batches", "d_model", "n_layers", "n_heads",
                     "n_kv_heads", "num_experts", "top_k", "d_expert"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"LabConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.eval_every, int) or self.eval_every < 0:
            raise ConfigError(f"LabConfig.eval_every must be an integer >= 0, got {self.eval_every!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"LabConfig.seed must be an integer >= 0, got {self.seed!r}")
        for name in ("lr", "unstable_lr", "unstable_router_std", "spike_factor"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"LabConfig.{name} must be a finite number > 0, got {value!r}")
        for name in ("skew_strength", "aux_loss_coef", "bias_update_rate", "z_loss_coef"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"LabConfig.{name} must be a finite number >= 0, got {value!r}")
        if self.top_k > self.num_experts:
            raise ConfigError(f"LabConfig.top_k={self.top_k} exceeds num_experts={self.num_experts}")
        for cf in self.capacity_factors:
            if cf is not None and not (math.isfinite(cf) and cf > 0):
                raise ConfigError(f"LabConfig.capacity_factors must hold numbers > 0 or None, got {cf!r}")

    def with_(self, **changes: Any) -> LabConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def model_config(self, vocab_size: int, **moe_changes: Any) -> ModelConfig:
        moe = MoEConfig(
            d_model=self.d_model, d_expert=self.d_expert, num_experts=self.num_experts, top_k=self.top_k,
            aux_loss_coef=self.aux_loss_coef, z_loss_coef=0.0,
        )
        moe = replace(moe, **moe_changes)
        return ModelConfig(
            vocab_size=vocab_size, d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads, d_ff=self.top_k * self.d_expert, moe=moe,
            max_seq_len=max(self.seq_len, 64),
        )


# Scales: "default" for `moelab lab`, "quick" for the demo, "test" for the test suite.
SCALES: dict[str, LabConfig] = {
    "default": LabConfig(),
    "quick": LabConfig(steps=80, batch_size=12, seq_len=48),
    "test": LabConfig(steps=25, batch_size=4, seq_len=32, d_model=32, n_heads=2, n_kv_heads=1,
                      d_expert=32, eval_batches=1),
}


# --------------------------------------------------------------------------- model surgery


@torch.no_grad()
def skew_router(model: Transformer, *, strength: float, favoured: Sequence[int] = (0, 1), seed: int = 0) -> None:
    """Put a model into the "rich get richer" state: every token prefers `favoured` experts.

    Adds a shared direction ``m`` (unit vector) to every token embedding, as large as the
    typical embedding itself, and adds ``beta * m`` to the favoured experts' router rows,
    with ``beta`` chosen so their logits are about `strength` above the others at init
    (the first favoured expert gets the full advantage, the next ones slightly less, so
    first and second choices are both taken). A shared component in hidden states is what
    trained transformers have anyway (anisotropy); here it is made deterministic.
    """
    cfg = model.cfg
    D = cfg.d_model
    g = torch.Generator().manual_seed(seed + 7919)
    m_D = torch.randn(D, generator=g)
    m_D /= m_D.norm()
    emb = model.embed_tokens.weight
    typical = emb.norm(dim=1).mean()
    emb.add_(typical * m_D)
    # After RMSNorm a vector of norm sqrt(D) (RMS 1) whose m-component is ~1/sqrt(2) of it.
    along_m = math.sqrt(D) / math.sqrt(2.0)
    for moe in model.moe_layers:
        for rank, e in enumerate(favoured):
            if e >= moe.cfg.num_experts:
                raise ConfigError(f"skew_router: favoured expert {e} >= num_experts={moe.cfg.num_experts}")
            moe.router.weight[e] += (strength * (1.0 - 0.15 * rank) / along_m) * m_D


@torch.no_grad()
def scale_router_init(model: Transformer, std: float, *, seed: int = 0) -> None:
    """Re-initialise every router with N(0, std): large std = large initial logits."""
    g = torch.Generator().manual_seed(seed + 104729)
    for moe in model.moe_layers:
        moe.router.weight.copy_(torch.randn(moe.router.weight.shape, generator=g) * std)


# --------------------------------------------------------------------------- results


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ExperimentResult:
    experiment: str
    runs: dict[str, RunSummary]
    verdicts: list[str]
    plots: dict[str, str]  # name -> path
    out_dir: str
    num_experts: int
    top_k: int
    config: dict[str, Any] = field(default_factory=dict)
    passed: bool = True  # every claimed effect was seen

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": RESULT_FORMAT,
            "version": 1,
            "experiment": self.experiment,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "uniform_share": 1.0 / self.num_experts,
            "passed": self.passed,
            "verdicts": self.verdicts,
            "runs": {name: r.to_dict() for name, r in self.runs.items()},
            "plots": self.plots,
            "out_dir": self.out_dir,
            "config": self.config,
        }

    def json_summary(self) -> dict[str, Any]:
        """The `moelab lab --json` object: final values per run."""
        keys = ("busiest_expert_share", "load_cv", "dead_experts", "dropped_fraction", "max_router_logit",
                "peak_router_logit", "initial_router_logit", "loss_spikes", "nan_steps", "val_loss", "steps_done", "stopped_reason",
                "bf16_routing_flips",
                "run_dir", "description")
        return {
            "experiment": self.experiment,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "passed": self.passed,
            "verdicts": self.verdicts,
            "runs": {name: {k: getattr(r, k) for k in keys} | {"per_layer": r.per_layer}
                     for name, r in self.runs.items()},
            "plots": self.plots,
        }


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
    peak = [_num_or_nan((r.get("layers") or {}).get(la, {}).get("max_router_logit"))
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
        initial_router_logit=_finite(max((_num_or_nan(v.get("max_router_logit"))
                                          for v in (metrics.train[0].get("layers") or {}).values()),
                                         default=float("nan"))) if n else None,
        loss_spikes=count_spikes(loss, spike_factor),
        nan_steps=int(nan_steps),
        val_loss=_finite(val_loss) if val_loss is not None else None,
        final_train_loss=float(np.mean(finite_loss[-window:])) if finite_loss.size else None,
        per_layer=per_layer,
        settings=settings or {},
    )


def _num_or_nan(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


@torch.no_grad()
def bf16_routing_flips(model: Transformer, batches: Sequence[torch.Tensor]) -> float | None:
    """Share of (token, MoE layer) pairs whose top-k expert set changes when the router
    logits come from a bf16 product instead of a float32 one (same weights, same inputs).

    Each MoE layer's input is captured on a normal forward of `batches` (token ids
    ``[B, T]``); the selection is the layer's own rule (`MoE._token_choice`: bias and
    expert groups included). ``None`` when the model has no token-choice MoE layer.
    """
    layers = [m for m in model.moe_layers if m.cfg.router != "expert_choice"]
    if not layers:
        return None
    inputs: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers))}
    hooks = [m.register_forward_pre_hook(lambda _m, args, i=i: inputs[i].append(args[0].detach()))
             for i, m in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        for ids in batches:
            model(ids.to(model.embed_tokens.weight.device), return_logits=False, telemetry=False)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    flips = total = 0
    for i, moe in enumerate(layers):
        w_ED = moe.router.weight.float()
        for x in inputs[i]:
            x_TD = x.reshape(-1, x.shape[-1]).float()
            sets = []
            for dtype in (torch.float32, torch.bfloat16):
                logits_TE = torch.nn.functional.linear(x_TD.to(dtype), w_ED.to(dtype)).float()
                _, idx_TK, _ = moe._token_choice(logits_TE)  # the layer's own selection rule
                sets.append(idx_TK.sort(dim=-1).values)
            flips += int((sets[0] != sets[1]).any(dim=-1).sum())
            total += x_TD.shape[0]
    return flips / total if total else None


# --------------------------------------------------------------------------- run specs


@dataclass(frozen=True)
class RunSpec:
    """One run of an experiment: its model config, lr and how to initialise it."""

    name: str
    description: str
    model_cfg: ModelConfig
    lr: float
    prepare: Callable[[Transformer], None] | None = None
    settings: dict[str, Any] = field(default_factory=dict)


def experiment_runs(experiment: str, cfg: LabConfig, vocab_size: int) -> list[RunSpec]:
    """The paired runs of `experiment` (same seed and data; the broken one first)."""
    E = cfg.num_experts
    if experiment == "collapse":
        skew = lambda m: skew_router(m, strength=cfg.skew_strength, seed=cfg.seed)  # noqa: E731
        return [
            RunSpec("broken-no-aux", "softmax top-k router skewed at init, no balancing loss",
                    cfg.model_config(vocab_size, aux_loss_coef=0.0), cfg.lr, skew,
                    {"router": "softmax", "aux_loss_coef": 0.0}),
            RunSpec("aux-loss", f"same init, load-balancing loss x {cfg.aux_loss_coef:g}",
                    cfg.model_config(vocab_size, aux_loss_coef=cfg.aux_loss_coef), cfg.lr, skew,
                    {"router": "softmax", "aux_loss_coef": cfg.aux_loss_coef}),
            RunSpec("aux-free-bias", f"same init, sigmoid router + aux-loss-free bias (rate {cfg.bias_update_rate:g})",
                    cfg.model_config(vocab_size, aux_loss_coef=0.0, router="sigmoid",
                                     bias_update_rate=cfg.bias_update_rate),
                    cfg.lr, skew,
                    {"router": "sigmoid", "aux_loss_coef": 0.0, "bias_update_rate": cfg.bias_update_rate}),
        ]
    if experiment == "instability":
        big = lambda m: scale_router_init(m, cfg.unstable_router_std, seed=cfg.seed)  # noqa: E731
        common = {"norm_topk_prob": False}
        return [
            RunSpec("broken-no-zloss",
                    f"router init std {cfg.unstable_router_std:g}, lr {cfg.unstable_lr:g}, no z-loss",
                    cfg.model_config(vocab_size, z_loss_coef=0.0, **common), cfg.unstable_lr, big,
                    {"z_loss_coef": 0.0, "lr": cfg.unstable_lr, "router_std": cfg.unstable_router_std}),
            RunSpec("broken-bf16-router", "same as broken-no-zloss, router logits from a bf16 product",
                    cfg.model_config(vocab_size, z_loss_coef=0.0, router_dtype="bfloat16", **common),
                    cfg.unstable_lr, big,
                    {"z_loss_coef": 0.0, "lr": cfg.unstable_lr, "router_std": cfg.unstable_router_std,
                     "router_dtype": "bfloat16"}),
            RunSpec("z-loss", f"same, router z-loss x {cfg.z_loss_coef:g}",
                    cfg.model_config(vocab_size, z_loss_coef=cfg.z_loss_coef, **common), cfg.unstable_lr, big,
                    {"z_loss_coef": cfg.z_loss_coef, "lr": cfg.unstable_lr, "router_std": cfg.unstable_router_std}),
        ]
    if experiment == "capacity":
        runs = []
        for cf in sorted(cfg.capacity_factors, key=lambda c: math.inf if c is None else c):
            name = "dropless" if cf is None else f"cf-{cf:g}"
            if cf is not None and cf < 1:
                name = "broken-" + name
            desc = "dropless (every routed token computed)" if cf is None else (
                f"capacity factor {cf:g}: each expert takes <= ceil({cf:g} x T x {cfg.top_k} / {E}) assignments")
            runs.append(RunSpec(name, desc, cfg.model_config(vocab_size, capacity_factor=cf), cfg.lr, None,
                                {"capacity_factor": cf}))
        return runs
    raise ConfigError(f"unknown lab experiment {experiment!r}; choose one of {EXPERIMENTS}")


# --------------------------------------------------------------------------- verdicts


def _verdicts(experiment: str, runs: dict[str, RunSummary], E: int) -> tuple[list[str], bool]:
    uniform = 1.0 / E
    out: list[str] = []
    ok = True
    if experiment == "collapse":
        broken_share = max((r.busiest_expert_share or 0.0 for r in runs.values() if r.name.startswith("broken")),
                           default=1.0)
        for r in runs.values():
            share = r.busiest_expert_share if r.busiest_expert_share is not None else float("nan")
            dead = r.dead_experts or 0
            collapsed = dead > 0 or share >= 3 * uniform
            balanced = share <= 1.5 * uniform and dead == 0
            state = "COLLAPSED" if collapsed else ("balanced" if balanced else "imbalanced, no dead experts")
            out.append(f"{r.name}: busiest expert takes {share:.3f} of assignments ({share / uniform:.1f}x uniform "
                       f"1/{E}), load CV {r.load_cv or 0:.2f}, {dead} dead experts -> {state}")
            if r.name.startswith("broken"):
                ok &= collapsed
            else:
                # The cure must undo the collapse: no dead expert, busiest share well below the broken run's.
                ok &= dead == 0 and share <= 0.6 * broken_share
    elif experiment == "instability":
        broken = [r for r in runs.values() if r.name.startswith("broken")]
        cured = [r for r in runs.values() if not r.name.startswith("broken")]
        for r in runs.values():
            end = f"stopped early at step {r.steps_done}: {r.stopped_reason}" if r.nan_steps else "finished"
            out.append(f"{r.name}: max |router logit| {r.max_router_logit or float('nan'):.1f} "
                       f"(peak {r.peak_router_logit or float('nan'):.1f}), {r.loss_spikes} loss spikes, "
                       f"{r.nan_steps} NaN/Inf steps, {end}")
        def growth(r: RunSummary) -> float:
            if r.nan_steps:
                return math.inf
            if r.max_router_logit is None or not r.initial_router_logit:
                return float("nan")
            return r.max_router_logit / r.initial_router_logit

        for b in broken:
            for c in cured:
                gb, gc = growth(b), growth(c)
                grew = gb >= 1.5 and gb > gc and (b.max_router_logit or math.inf) > (c.max_router_logit or 0)
                worse = b.loss_spikes + b.nan_steps > c.loss_spikes + c.nan_steps
                out.append(f"{b.name} vs {c.name}: router logits grew {gb:.1f}x over training without the cure, "
                           f"{gc:.1f}x with it -> {'cure works' if grew else 'NO clear effect'}; loss "
                           f"{'spiked/diverged more' if worse else 'did not spike more'} without the cure")
                ok &= grew
        for r in runs.values():
            if r.bf16_routing_flips is not None:
                out.append(f"{r.name}: a bf16 router would choose a different top-k set for "
                           f"{r.bf16_routing_flips:.1%} of (token, layer) pairs than this float32 one"
                           + (" (this run's router was bf16)" if r.settings.get("router_dtype") == "bfloat16" else ""))
        bf16 = runs.get("broken-bf16-router")
        fp32 = runs.get("broken-no-zloss")
        if bf16 and fp32 and bf16.val_loss is not None and fp32.val_loss is not None:
            out.append(f"bf16 router vs float32 router (both without z-loss): val loss {bf16.val_loss:.3f} vs "
                       f"{fp32.val_loss:.3f} ({bf16.val_loss - fp32.val_loss:+.3f})")
    elif experiment == "capacity":
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
    return out, ok


# --------------------------------------------------------------------------- running


def _train_one(spec: RunSpec, cfg: LabConfig, data: Any, run_dir: Path, progress: bool) -> tuple[Any, Transformer]:
    """Train one run through `moelab.train.train` from a model prepared by `spec`;
    returns (the train result or `_Diverged`, the trained model)."""
    from moelab.train import TrainConfig, train

    torch.manual_seed(cfg.seed)
    model = Transformer(spec.model_cfg)
    if spec.prepare is not None:
        spec.prepare(model)
    train_cfg = TrainConfig(
        steps=cfg.steps, batch_size=cfg.batch_size, seq_len=cfg.seq_len, lr=spec.lr, seed=cfg.seed,
        warmup_steps=max(1, cfg.steps // 10), eval_interval=cfg.eval_every, eval_batches=cfg.eval_batches,
        checkpoint_interval=0, log_interval=max(1, cfg.steps // 20),
    )
    # TensorBoard off: the lab reads metrics.jsonl, and event files cost time on short runs.
    try:
        result = train(spec.model_cfg, train_cfg, data, run_dir, progress=progress, model=model, tensorboard=False,
                       overwrite=True)
        return result, model
    except (NonFiniteRouterError, FloatingPointError) as e:
        # The trainer stops cleanly on a non-finite training step; a model that is already
        # broken can also fail in an evaluation pass (e.g. the one at step 0). Same verdict.
        done = [r for r in _read_rows(run_dir) if r.get("kind") == "train"]
        logger.warning("%s diverged outside a training step: %s", spec.name, e)
        return _Diverged(steps_done=int(done[-1]["step"]) if done else 0, stopped_reason=f"diverged: {e}"), model


@dataclass
class _Diverged:
    """What `_train_one` returns when the run diverged outside the trainer's own checks."""

    steps_done: int
    stopped_reason: str
    nan_steps: int = 1
    val_loss: float | None = None


def _read_rows(run_dir: Path) -> list[dict[str, Any]]:
    try:
        return RunMetrics.from_run(run_dir).train
    except DataError:
        return []


def run_experiment(
    experiment: str,
    data: Any,
    out_dir: str | Path,
    *,
    config: LabConfig | None = None,
    progress: bool = True,
    only: Sequence[str] | None = None,
) -> ExperimentResult:
    """Run the paired runs of `experiment`, summarise them, write plots and ``experiment.json``.

    `data` is a `moelab.data.PreparedData`; each run goes to ``out_dir/<run name>/``
    (a full run directory). `only` restricts to some run names (tests, the demo).
    A run that diverges is stopped by the trainer and reported, never raised.
    """
    if experiment not in EXPERIMENTS:
        raise ConfigError(f"unknown lab experiment {experiment!r}; choose one of {EXPERIMENTS}")
    cfg = config or LabConfig()
    out = Path(out_dir)
    specs = experiment_runs(experiment, cfg, data.vocab_size)
    if only:
        unknown = set(only) - {s.name for s in specs}
        if unknown:
            raise ConfigError(f"unknown run(s) {sorted(unknown)} for {experiment}; runs are {[s.name for s in specs]}")
        specs = [s for s in specs if s.name in only]
    summaries: dict[str, RunSummary] = {}
    metrics: dict[str, RunMetrics] = {}
    for spec in specs:
        run_dir = out / spec.name
        logger.info("lab %s: run %s (%s)", experiment, spec.name, spec.description)
        res, model = _train_one(spec, cfg, data, run_dir, progress)
        metrics[spec.name] = RunMetrics.from_run(run_dir)
        flips = None
        if experiment == "instability" and not getattr(res, "stopped_reason", None):
            val = val_batches(data.val, cfg.batch_size, cfg.seq_len, max_batches_per_domain=cfg.eval_batches)
            flips = bf16_routing_flips(model, [x for batches in val.values() for x, _ in batches])
        summaries[spec.name] = summarize_run(
            spec.name, metrics[spec.name], run_dir=run_dir, description=spec.description,
            # A run stopped on NaN has no trained model to evaluate: its last evaluation is
            # from before the divergence (often step 0), so report no val loss at all.
            val_loss=None if getattr(res, "stopped_reason", None) else getattr(res, "val_loss", None),
            nan_steps=getattr(res, "nan_steps", None),
            stopped_reason=getattr(res, "stopped_reason", None), steps_done=getattr(res, "steps_done", None),
            spike_factor=cfg.spike_factor, settings=spec.settings,
        )
        summaries[spec.name].bf16_routing_flips = flips
    verdicts, ok = _verdicts(experiment, summaries, cfg.num_experts)
    result = ExperimentResult(
        experiment=experiment, runs=summaries, verdicts=verdicts, plots={}, out_dir=str(out),
        num_experts=cfg.num_experts, top_k=cfg.top_k, config=cfg.to_dict(), passed=ok,
    )
    result.plots = {k: str(v) for k, v in draw_experiment_plots(experiment, metrics, out, cfg.num_experts).items()}
    atomic_write_json(out / "experiment.json", result.to_dict())
    return result


def draw_experiment_plots(experiment: str, metrics: dict[str, RunMetrics], out: Path, num_experts: int) -> dict[str, Path]:
    """The experiment's plots from its runs' metrics (also used to redraw from disk)."""
    p = out / "plots"
    uniform = 1.0 / num_experts
    made: dict[str, Path] = {
        "loss": plots.plot_training_curves(metrics, p / "loss.png", title=f"{experiment}: training loss"),
    }
    if experiment == "collapse":
        made["busiest_share"] = plots.plot_lab_metric(
            metrics, "busiest_expert_share", p / "busiest_share.png", reduce="max", per_layer=True,
            ylabel="busiest expert's share", hline=uniform, hline_label="uniform 1/E",
            title="collapse: share of assignments on the busiest expert, per layer")
        made["dead_experts"] = plots.plot_lab_metric(
            metrics, "dead_experts", p / "dead_experts.png", reduce="sum", ylabel="dead experts (all layers)",
            title="collapse: experts with no token in a step")
        made["load_cv"] = plots.plot_lab_metric(
            metrics, "load_cv", p / "load_cv.png", reduce="mean", ylabel="load CV (mean over layers)",
            title="collapse: coefficient of variation of expert load")
    elif experiment == "instability":
        made["max_router_logit"] = plots.plot_lab_metric(
            metrics, "max_router_logit", p / "max_router_logit.png", reduce="max", log=True,
            ylabel="max |router logit|", title="instability: largest router logit per step")
    elif experiment == "capacity":
        made["dropped"] = plots.plot_lab_metric(
            metrics, "dropped_fraction", p / "dropped_fraction.png", reduce="mean", per_layer=True,
            ylabel="dropped fraction", title="capacity: fraction of assignments dropped, per layer")
    for name, m in metrics.items():
        if m.layers:
            made[f"load_{name}"] = plots.plot_expert_load(m, p / f"expert_load_{name}.png",
                                                          title=f"{experiment} / {name}: expert load")
    return made


def load_experiment(path: str | Path) -> dict[str, Any]:
    """Read an ``experiment.json`` (a file or the experiment folder)."""
    import json

    from moelab.errors import DataError

    path = Path(path)
    if path.is_dir():
        path = path / "experiment.json"
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path} does not exist: not a lab experiment folder") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON: {e}") from e
    if d.get("format") != RESULT_FORMAT:
        raise DataError(f"{path} is not a moelab lab result (format {d.get('format')!r})")
    return d


def verdict_table(result: ExperimentResult | dict[str, Any]) -> str:
    """A text table of the final figures of each run (what `moelab lab` prints)."""
    d = result.to_dict() if isinstance(result, ExperimentResult) else result
    E = d["num_experts"]
    head = ["run", "busiest", "x1/E", "load CV", "dead", "dropped", "max logit", "spikes", "NaN", "val loss"]
    rows = []
    for name, r in d["runs"].items():
        share = r.get("busiest_expert_share")

        def f(v: Any, fmt: str) -> str:
            return "-" if v is None else format(v, fmt)

        rows.append([name, f(share, ".3f"), f(share * E if share is not None else None, ".1f"), f(r.get("load_cv"), ".2f"),
                     f(r.get("dead_experts"), "d"), f(r.get("dropped_fraction"), ".1%"),
                     f(r.get("max_router_logit"), ".1f"), f(r.get("loss_spikes"), "d"), f(r.get("nan_steps"), "d"),
                     f(r.get("val_loss"), ".3f")])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])
