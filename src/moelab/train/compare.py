"""MoE vs dense: train matched models on the same token stream and compare.

Up to four models: the MoE, the dense model with the MoE's *active* FFN width (same FLOPs
per token: the fair compute baseline), optionally the dense model with the MoE's *total*
FFN width (same parameters, E/K times the FFN compute: the other side of the trade) and
optionally a second, coarse-grained MoE (``moe_coarse``: e.g. Mixtral-style top-2 of 8
beside a fine-grained main MoE). All train with the same `TrainConfig` (so the same seed
and the same step-indexed batches).

Steps to reach a loss: the first point where a model's validation curve (evaluated every
``eval_interval`` steps, plus step 0) falls to the dense model's *final* validation loss,
linearly interpolated between the two eval points that bracket it. ``None`` when the
model never gets there within the run. Every model but the dense one gets the figure.

The trade-off (docs/train.md, "Quality per FLOP and per byte"): a model's *quality* is
``ln(vocab) - val_loss``, the nats per token it has learned beyond a uniform guess over
the vocabulary. Quality per FLOP is taken at *equal training compute*: the quality on the
model's eval curve at the training FLOPs the dense model spent in its whole run (its val
loss interpolated there), divided by those TFLOP. Quality per byte is the final quality
divided by the weights' size (MiB, bf16: every expert resident). An MoE with its dense
twin's active FLOPs wins the first exactly when its loss at the dense budget is lower,
and loses the second unless its loss falls as fast as its weights grow.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from moelab.accounting import count_params, spec_from_moelab_config
from moelab.accounting.flops import forward_flops_per_token, training_flops_per_token
from moelab.accounting.memory import weight_bytes
from moelab.data import PreparedData
from moelab.errors import ConfigError
from moelab.io import atomic_write_json
from moelab.model import ModelConfig
from moelab.rundir.files import STATE_FILE
from moelab.train.metrics import last_step
from moelab.train.trainer import TrainConfig, TrainResult, train
from moelab.train.workers import plan_workers, run_parallel

logger = logging.getLogger(__name__)

ROLES = ("moe", "dense", "dense_total", "moe_coarse")
# Written by `compare` beside the run directories (`ComparisonResult.to_dict()`); the
# HTML report (`moelab.lab.report`) shows it as the trade-off table.
COMPARISON_FILE = "comparison.json"
# The weights' dtype of "quality per byte": what a served model holds (`moelab size`'s default).
WEIGHT_DTYPE = "bf16"
MIB = 2**20


def learned_nats(val_loss: float, vocab_size: int) -> float:
    """Quality of a language model: ``ln(vocab_size) - val_loss``, the nats per token its
    predictions gain over a uniform guess (0 at initialisation, up to ln V for a perfect
    predictor). A loss is not a quantity one can divide by a cost; this is (more is better)."""
    return math.log(vocab_size) - val_loss


def loss_at_step(history: list[dict], step: float) -> float | None:
    """The val loss of an eval curve at a (fractional) `step`, linearly interpolated
    between the eval points that bracket it; None outside the curve."""
    points = sorted((r["step"], r["val_loss"]) for r in history if r.get("val_loss") is not None)
    for (s0, l0), (s1, l1) in zip(points, points[1:], strict=False):
        if s0 <= step <= s1:
            return l0 if s1 == s0 else l0 + (l1 - l0) * (step - s0) / (s1 - s0)
    return points[-1][1] if points and points[-1][0] == step else None


def quality_per_tflop(history: list[dict], vocab_size: int, flops_per_step: float,
                      budget_flops: float) -> float | None:
    """Quality (`learned_nats`) at `budget_flops` of training compute, per TFLOP: the eval
    curve read at step ``budget / flops_per_step`` (or at its end, with the FLOPs it spent,
    if the run stopped short of the budget). None without a val loss there."""
    points = [r for r in history if r.get("val_loss") is not None]
    if not points or flops_per_step <= 0:
        return None
    last = max(r["step"] for r in points)
    step = min(budget_flops / flops_per_step, last)
    loss = loss_at_step(points, step)
    if loss is None or not math.isfinite(loss) or step <= 0:
        return None
    return learned_nats(loss, vocab_size) / (step * flops_per_step / 1e12)


def quality_per_mib(val_loss: float | None, vocab_size: int, weight_bytes_: float) -> float | None:
    """Final quality (`learned_nats`) per MiB of weights; None without a val loss."""
    return None if val_loss is None else learned_nats(val_loss, vocab_size) / (weight_bytes_ / MIB)


@dataclass(frozen=True)
class ModelSummary:
    name: str  # preset name (or what the caller called it)
    role: str  # "moe", "dense" (matched active) or "dense_total" (matched total)
    total_params: int
    active_params: int  # per token: total minus the routed experts a token does not use
    forward_flops_per_token: float  # at context = seq_len (moelab.accounting.flops)
    train_flops_per_token: float  # 3x forward
    vocab_size: int
    tokens_trained: int  # steps_done x batch_size x seq_len
    train_flops: float  # train_flops_per_token x tokens_trained: the run's training compute
    weight_bytes: float  # all parameters at WEIGHT_DTYPE (every expert resident)
    tokens_per_s: float
    step_time_s: float
    val_loss: float | None
    val_loss_by_domain: dict[str, float]
    steps_done: int
    history: list[dict] = field(default_factory=list)  # {"step", "val_loss"}
    stopped_reason: str | None = None
    run_dir: str | None = None
    threads: int = 0
    load_avg: float | None = None  # median 1-minute load average while it trained: timings depend on it
    # Steps (interpolated) to reach the dense model's final val loss, and / dense steps;
    # None for the dense model itself and for a model that never got there.
    steps_to_dense_loss: float | None = None
    steps_to_dense_loss_ratio: float | None = None
    # Nats learned per TFLOP at the dense run's training FLOPs (`quality_per_tflop`); set by
    # `compare`, which knows that budget.
    quality_per_tflop: float | None = None

    @property
    def quality_per_mib(self) -> float | None:
        """Nats per token learned (`learned_nats`) per MiB of weights (WEIGHT_DTYPE)."""
        return quality_per_mib(self.val_loss, self.vocab_size, self.weight_bytes)


@dataclass(frozen=True)
class ComparisonResult:
    models: dict[str, ModelSummary]  # by role
    moe_steps_to_dense_loss: float | None
    moe_steps_to_dense_loss_ratio: float | None  # / dense steps; < 1: the MoE learns faster per step
    time_per_step_ratio: float | None  # MoE step time / dense step time
    train_config: dict

    def to_dict(self) -> dict:
        """JSON form: ``models`` keyed by model name, ``roles`` mapping role -> name."""
        models = {}
        for m in self.models.values():
            d = asdict(m)
            d["quality_per_mib"] = m.quality_per_mib
            d["history"] = [{"step": r["step"], "val_loss": r["val_loss"]} for r in m.history]
            models[m.name] = d
        return {
            "models": models,
            "roles": {role: m.name for role, m in self.models.items()},
            "moe_steps_to_dense_loss": self.moe_steps_to_dense_loss,
            "moe_steps_to_dense_loss_ratio": self.moe_steps_to_dense_loss_ratio,
            "time_per_step_ratio": self.time_per_step_ratio,
            "train_config": self.train_config,
            "conventions": {
                "moe_steps_to_dense_loss": "first crossing of the dense model's final val loss on the MoE's "
                "eval curve, linearly interpolated between eval points; ratio = that / dense steps",
                "val_loss": "next-token cross-entropy (nats), token-weighted over all validation tokens",
                "active_params": "parameters used per token (routed experts: top_k of num_experts)",
                "flops_per_token": "2 * active matmul params + attention scores at context seq_len; train = 3x",
                "tokens_per_s": "median over steady-state training steps (data + forward + backward + AdamW)",
                "steps_to_dense_loss": "per model, the same crossing as moe_steps_to_dense_loss",
                "quality_per_tflop": "(ln(vocab_size) - L) / (B / 1e12): nats per token learned beyond a uniform "
                "guess per training TFLOP, at B = the dense run's train_flops (train_flops_per_token x tokens), L = "
                "the model's val loss interpolated on its eval curve at B",
                "quality_per_mib": f"(ln(vocab_size) - val_loss) / (weight_bytes / 2^20), weights in {WEIGHT_DTYPE}",
            },
        }


def steps_to_reach(history: list[dict], target: float) -> float | None:
    """First (interpolated) step at which an eval curve reaches `target` (see module doc)."""
    points = sorted((r["step"], r["val_loss"]) for r in history if r.get("val_loss") is not None)
    for i, (step, loss) in enumerate(points):
        if loss <= target:
            if i == 0:
                return float(step)
            s0, l0 = points[i - 1]
            return s0 + (l0 - target) / (l0 - loss) * (step - s0)
    return None


def summarize(name: str, role: str, cfg: ModelConfig, train_cfg: TrainConfig, result: TrainResult) -> ModelSummary:
    spec = spec_from_moelab_config(cfg, name=name)
    counts = count_params(spec)
    train_flops_per_token = training_flops_per_token(spec, counts, train_cfg.seq_len)
    tokens = result.steps_done * train_cfg.batch_size * train_cfg.seq_len
    return ModelSummary(
        name=name,
        role=role,
        total_params=counts.total,
        active_params=counts.active,
        forward_flops_per_token=forward_flops_per_token(spec, counts, train_cfg.seq_len),
        train_flops_per_token=train_flops_per_token,
        vocab_size=cfg.vocab_size,
        tokens_trained=tokens,
        train_flops=train_flops_per_token * tokens,
        weight_bytes=weight_bytes(counts, WEIGHT_DTYPE),
        tokens_per_s=result.tokens_per_s,
        step_time_s=result.step_time_s,
        val_loss=result.val_loss,
        val_loss_by_domain=result.val_loss_by_domain,
        steps_done=result.steps_done,
        history=result.history,
        stopped_reason=result.stopped_reason,
        run_dir=str(result.out_dir) if result.out_dir else None,
        threads=result.threads,
        load_avg=result.load_avg,
    )


def _train_one(cfg: ModelConfig, train_cfg: TrainConfig, data: PreparedData, run_dir: Path, *, progress: bool,
               tensorboard: bool, overwrite: bool, resume: bool) -> TrainResult:
    """One compared model's run; ``resume`` continues it (see `compare`)."""
    logger.info("training %s for %d steps", run_dir.name, train_cfg.steps)
    if resume and (run_dir / STATE_FILE).is_file():
        logger.info("%s: resuming %s", run_dir.name, run_dir)
        return train(cfg, train_cfg, data, run_dir, progress=progress, tensorboard=tensorboard, resume=True)
    return train(cfg, train_cfg, data, run_dir, progress=progress, tensorboard=tensorboard,
                 overwrite=overwrite or (resume and run_dir.is_dir()))


def _train_in_worker(cfg: ModelConfig, train_cfg: TrainConfig, cache_entry: str, run_dir: str,
                     flags: dict[str, bool]) -> TrainResult:
    from moelab.data import load_cache_entry

    return _train_one(cfg, train_cfg, load_cache_entry(cache_entry), Path(run_dir), progress=False, **flags)


def compare(
    models: dict[str, tuple[str, ModelConfig]],
    train_cfg: TrainConfig,
    data: PreparedData,
    out_dir: str | Path,
    *,
    progress: bool = True,
    overwrite: bool = False,
    tensorboard: bool = True,
    resume: bool = False,
    workers: int | None = 1,
    threads: int | None = None,
) -> ComparisonResult:
    """Train each model (``{role: (name, config)}``, roles from `ROLES`; "moe" and "dense"
    required) under ``out_dir/<name>`` and compare them.

    ``workers``: train the models side by side in that many worker processes
    (`moelab.train.workers`; ``None``: one per core), each with an equal share of
    `threads` (default: the cores). ``1``: one after the other in this process.

    ``resume=True`` continues an interrupted comparison: a finished run is kept as it is
    (read back, not retrained), one with a checkpoint resumes from it, one killed before
    its first checkpoint starts again, a missing one is trained."""
    missing = {"moe", "dense"} - set(models)
    if missing:
        raise ValueError(f"compare needs the roles 'moe' and 'dense'; missing {sorted(missing)}")
    unknown = set(models) - set(ROLES)
    if unknown:
        raise ValueError(f"compare: unknown role(s) {sorted(unknown)}; roles are {ROLES}")
    names = [name for name, _ in models.values()]
    if len(set(names)) != len(names):
        raise ValueError(f"compare: model names must differ (each gets its own run directory), got {names}")
    out_dir = Path(out_dir)
    runs = [(role, *models[role]) for role in ROLES if role in models]
    n_workers, threads = plan_workers(len(runs), workers, threads)
    flags = dict(tensorboard=tensorboard, overwrite=overwrite, resume=resume)
    if n_workers == 1:
        results = [_train_one(cfg, train_cfg, data, out_dir / name, progress=progress, **flags)
                   for _, name, cfg in runs]
    else:
        # Side by side: no progress bars (they would interleave), a log line per run.
        logger.info("training %s in %d worker processes of %d thread(s)", ", ".join(n for _, n, _ in runs),
                    n_workers, threads)
        worker_cfg = replace(train_cfg, num_threads=threads)  # not a maths field: resume accepts it

        def report() -> None:
            steps = [(name, last_step(out_dir / name)) for _, name, _ in runs]
            logger.info("side by side: %s", ", ".join(f"{n} step {'-' if s is None else s}/{train_cfg.steps}"
                                                     for n, s in steps))

        results = run_parallel(_train_in_worker, [(cfg, worker_cfg, str(data.cache_dir), str(out_dir / name), flags)
                                                  for _, name, cfg in runs], workers=n_workers, threads=threads,
                               names=[name for _, name, _ in runs], on_wait=report if progress else None)
    summaries: dict[str, ModelSummary] = {}
    for (role, name, cfg), result in zip(runs, results, strict=True):
        summaries[role] = summarize(name, role, cfg, train_cfg, result)
        logger.info("%s: val_loss %s, %.0f tokens/s", name, result.val_loss, result.tokens_per_s)

    dense = summaries["dense"]
    tokens_per_step = train_cfg.batch_size * train_cfg.seq_len
    for role, m in summaries.items():
        summaries[role] = m = replace(m, quality_per_tflop=quality_per_tflop(
            m.history, m.vocab_size, m.train_flops_per_token * tokens_per_step, dense.train_flops))
        if role != "dense" and dense.val_loss is not None and dense.stopped_reason is None:
            if (steps := steps_to_reach(m.history, dense.val_loss)) is not None:
                summaries[role] = replace(m, steps_to_dense_loss=steps,
                                          steps_to_dense_loss_ratio=steps / dense.steps_done)
    moe = summaries["moe"]
    steps, ratio = moe.steps_to_dense_loss, moe.steps_to_dense_loss_ratio
    time_ratio = moe.step_time_s / dense.step_time_s if dense.step_time_s > 0 else None
    result = ComparisonResult(
        models=summaries,
        moe_steps_to_dense_loss=steps,
        moe_steps_to_dense_loss_ratio=ratio,
        time_per_step_ratio=time_ratio,
        train_config=train_cfg.to_dict(),
    )
    atomic_write_json(out_dir / COMPARISON_FILE, result.to_dict())
    return result


@dataclass(frozen=True)
class SeedsComparison:
    """`compare` repeated over seeds (init and batch order change together).

    At the default comparison scale the val loss of one model moves by ~0.03-0.08
    between seeds (BENCHMARKS.md), as much as the MoE-vs-dense gap, so one seed can
    show an effect that the next does not. Aggregates: per role the mean and the
    population std of the final val loss over seeds; the steps-to-dense-loss ratio per
    seed, and on the seed-mean curves (MoE mean curve against the dense mean final loss).
    """

    seeds: list[int]
    results: list[ComparisonResult]  # one per seed, same order

    def val_loss_stats(self) -> dict[str, dict[str, float | None]]:
        out: dict[str, dict[str, float | None]] = {}
        for role in self.results[0].models:
            vals = [r.models[role].val_loss for r in self.results]
            if any(v is None for v in vals):
                out[role] = {"mean": None, "std": None}
            else:
                mean = sum(vals) / len(vals)
                out[role] = {"mean": mean, "std": (sum((v - mean) ** 2 for v in vals) / len(vals)) ** 0.5}
        return out

    def mean_curve_ratio(self) -> float | None:
        """Steps for the MoE's seed-mean val curve to reach the dense seed-mean final loss,
        / dense steps (the same convention as `ComparisonResult`)."""
        curves = [r.models["moe"].history for r in self.results]
        steps = sorted(set.intersection(*({h["step"] for h in c if h.get("val_loss") is not None} for c in curves)))
        mean_hist = [{"step": st, "val_loss": sum(next(h["val_loss"] for h in c if h["step"] == st) for c in curves)
                      / len(curves)} for st in steps]
        target = self.val_loss_stats()["dense"]["mean"]
        if target is None or not mean_hist:
            return None
        reached = steps_to_reach(mean_hist, target)
        return None if reached is None else reached / self.results[0].models["dense"].steps_done

    def tradeoff(self) -> dict[str, dict[str, Any]]:
        """The seeds' trade-off table, by role: name, val loss mean/std, the steps-to-dense-loss
        ratio per seed, and the seed means of quality per TFLOP and per MiB (None when a
        seed has no val loss)."""
        stats = self.val_loss_stats()

        def mean(xs: list[float | None]) -> float | None:
            return None if any(x is None for x in xs) else sum(xs) / len(xs)

        out = {}
        for role in self.results[0].models:
            ms = [r.models[role] for r in self.results]
            out[role] = {
                "name": ms[0].name,
                "val_loss_mean": stats[role]["mean"],
                "val_loss_std": stats[role]["std"],
                "steps_to_dense_loss_ratio_per_seed": None if role == "dense"
                else [m.steps_to_dense_loss_ratio for m in ms],
                "quality_per_tflop_mean": mean([m.quality_per_tflop for m in ms]),
                "quality_per_mib_mean": mean([m.quality_per_mib for m in ms]),
            }
        return out

    def to_dict(self) -> dict:
        times = [r.time_per_step_ratio for r in self.results if r.time_per_step_ratio is not None]
        return {
            "seeds": self.seeds,
            "tradeoff": self.tradeoff(),
            "val_loss": {self.results[0].models[role].name: st for role, st in self.val_loss_stats().items()},
            "moe_steps_to_dense_loss_ratio_per_seed": [r.moe_steps_to_dense_loss_ratio for r in self.results],
            "moe_steps_to_dense_loss_ratio_mean_curves": self.mean_curve_ratio(),
            "time_per_step_ratio_mean": sum(times) / len(times) if times else None,
            "per_seed": [r.to_dict() for r in self.results],
        }


def compare_seeds(
    models: dict[str, tuple[str, ModelConfig]],
    train_cfg: TrainConfig,
    data: PreparedData,
    out_dir: str | Path,
    seeds: Sequence[int],
    **kwargs: Any,
) -> SeedsComparison:
    """`compare` once per seed, each under ``out_dir/seed-<s>/``; see `SeedsComparison`."""
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds) or any(not isinstance(s, int) or s < 0 for s in seeds):
        raise ConfigError(f"compare: seeds must be distinct integers >= 0, got {seeds}")
    results = [compare(models, replace(train_cfg, seed=s), data, Path(out_dir) / f"seed-{s}", **kwargs)
               for s in seeds]
    return SeedsComparison(seeds=seeds, results=results)


def render_seeds(result: SeedsComparison) -> str:
    """Plain-text summary of a multi-seed comparison (the per-seed tables first)."""
    parts = [f"--- seed {s} ---\n{render_table(r)}" for s, r in zip(result.seeds, result.results, strict=True)]
    table = [["model", "role", "val loss (mean +- std)", "steps to dense loss, per seed", "nats/TFLOP",
              "nats/MiB"]]
    for role, t in result.tradeoff().items():
        per_seed = t["steps_to_dense_loss_ratio_per_seed"]
        table.append([t["name"], role,
                      "-" if t["val_loss_mean"] is None else f"{t['val_loss_mean']:.4f} +- {t['val_loss_std']:.4f}",
                      "-" if per_seed is None else ", ".join(_ratio(x) for x in per_seed),
                      _fmt(t["quality_per_tflop_mean"], ".4f"), _fmt(t["quality_per_mib_mean"], ".4f")])
    lines = [f"--- over seeds {result.seeds}: the trade-off ---", *_aligned(table), TRADEOFF_NOTE]
    per_seed = ", ".join("never" if r is None else f"{r:.2f}x" for r in
                         (x.moe_steps_to_dense_loss_ratio for x in result.results))
    mean_ratio = result.mean_curve_ratio()
    lines.append(f"MoE steps to the dense model's final val loss, per seed: {per_seed}; on the seed-mean curves: "
                 + ("never" if mean_ratio is None else f"{mean_ratio:.2f}x"))
    return "\n\n".join(parts) + "\n\n" + "\n".join(lines)


def _ratio(x: float | None) -> str:
    return "never" if x is None else f"{x:.2f}x"


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _aligned(table: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


TRADEOFF_NOTE = ("quality = ln(vocab) - val loss (nats/token learned beyond a uniform guess); nats/TFLOP: per "
                 "training TFLOP, at the dense run's training FLOPs (equal compute); nats/MiB: final quality per "
                 f"MiB of weights ({WEIGHT_DTYPE}, every expert resident)")


def render_table(result: ComparisonResult) -> str:
    """A plain-text table of the comparison (for the CLI), with the quality-per-FLOP and
    quality-per-byte columns (module docstring)."""
    rows = list(result.models.values())
    domains = sorted({d for m in rows for d in m.val_loss_by_domain})
    header = ["model", "role", "total params", "active params", "train GFLOP/tok", "tokens/s", "s/step",
              "val loss", "steps to dense loss", "nats/TFLOP", "nats/MiB", *[f"val {d}" for d in domains]]
    table = [header]
    for m in rows:
        table.append([
            m.name,
            m.role,
            f"{m.total_params / 1e6:.2f}M",
            f"{m.active_params / 1e6:.2f}M",
            f"{m.train_flops_per_token / 1e9:.4f}",
            f"{m.tokens_per_s:.0f}",
            f"{m.step_time_s:.3f}",
            _fmt(m.val_loss, ".4f"),
            "-" if m.role == "dense" else _ratio(m.steps_to_dense_loss_ratio),
            _fmt(m.quality_per_tflop, ".4f"),
            _fmt(m.quality_per_mib, ".4f"),
            *[f"{m.val_loss_by_domain[d]:.4f}" if d in m.val_loss_by_domain else "-" for d in domains],
        ])
    lines = _aligned(table)
    lines.append(TRADEOFF_NOTE)
    moe, dense = result.models["moe"], result.models["dense"]
    if result.moe_steps_to_dense_loss is not None:
        lines.append(
            f"\n{moe.name} reaches {dense.name}'s final val loss ({dense.val_loss:.4f}) at step "
            f"{result.moe_steps_to_dense_loss:.0f} of {dense.steps_done}: "
            f"{result.moe_steps_to_dense_loss_ratio:.2f}x the steps"
        )
    else:
        lines.append(f"\n{moe.name} did not reach {dense.name}'s final val loss within {moe.steps_done} steps")
    if result.time_per_step_ratio is not None:
        under = "; ".join(f"{m.name} {m.threads} threads, load {m.load_avg:.1f}" for m in rows if m.load_avg is not None)
        lines.append(f"time per step, {moe.name} / {dense.name}: {result.time_per_step_ratio:.2f}x"
                     + (f" (measured under: {under})" if under else ""))
    for m in rows:
        if m.stopped_reason:
            lines.append(f"{m.name} stopped early: {m.stopped_reason}")
    return "\n".join(lines)
