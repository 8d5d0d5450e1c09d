"""The training loop: AdamW, warmup + cosine, clipping, MoE losses, eval, checkpoints.

`train(model_cfg, train_cfg, data, out_dir)` trains a `Transformer` on a `PreparedData`
and writes a run directory (`moelab.rundir`, `moelab.train.checkpoint`). Design points:

* Exact resume. Training batches are a pure function of ``(seed, step)``
  (`moelab.data.TokenBatcher`), the learning rate a pure function of the step, and the
  checkpoint holds the model, the AdamW state and every RNG state; so a run resumed from
  step s retraces the uninterrupted run's losses and, on CPU, its parameters bit for bit.
* Ctrl-C is a request, not a crash: the first SIGINT lets the step in flight finish (an
  optimizer step cut in half would be a state no run ever had), writes a checkpoint at
  that step and raises `TrainingInterrupted`; a second SIGINT stops at once (the last
  checkpoint is intact, as always). Resuming then retraces the uninterrupted run.
* Non-finite losses never crash: a NaN/Inf loss or gradient norm, or a router that sees
  NaN/Inf logits (`NonFiniteRouterError`), stops the run before the optimizer step, with
  ``stopped_reason`` set, the metrics written and the last good checkpoint untouched.
* Validation loss is the next-token cross-entropy (without the MoE losses) over fixed,
  deterministic windows of each domain's validation split. Per domain it is the mean over
  that domain's tokens; overall it is token-weighted: the mean over all validation tokens
  of all domains (equal to the mean of the domains when they have equal token counts,
  which `val_batches` gives unless a domain is shorter than ``eval_batches`` batches).
* Precision (``TrainConfig.precision``, resolved by `resolve_precision`): ``"auto"`` is
  bf16 autocast on CUDA (no loss scaling needed: bf16 has fp32's exponent range), and on
  a CPU only where the CPU computes bf16 natively (`moelab.hardware.cpu_native_bf16`:
  AMX-BF16 or AVX512-BF16 in its flags), fp32 elsewhere. Measured, 2 threads, one step of
  batch 8 x 128 interleaved in one process: on an AVX512-BF16 CPU (AMD EPYC, 2026-12-01)
  bf16 autocast was faster for every model tried (tiny-moe 1.10x, tiny-dense 1.46x,
  small-moe 1.03x, a d_model-512 MoE 1.17x); on a CPU without native bf16 the bf16 GEMMs
  are emulated and ran about 400x *slower*. ``"fp32"`` forces fp32 everywhere (a GPU run
  then follows the CPU's maths, e.g. to sweep settings for a CPU experiment; also the
  choice for bit-exact comparisons across machines); ``"bf16"`` forces bf16 autocast.
  Parameters and optimizer state stay fp32. ``MOELAB_CPU_BF16=0/1`` overrides the CPU
  detection.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import shutil
import signal
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from moelab import hardware
from moelab.data import PreparedData, TokenBatcher, val_batches
from moelab.errors import CheckpointError, ConfigError
from moelab.io import atomic_write_text
from moelab.model import ModelConfig, Transformer
from moelab.moe import NonFiniteRouterError
from moelab.rundir import files as run_files
from moelab.train import checkpoint as ckpt
from moelab.train.metrics import METRICS_FILE, MetricsWriter, read_metrics, truncate_metrics

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
# Fields that may differ between a run and its resumption without changing the maths.
RESUMABLE_CHANGES = frozenset(
    {"steps", "eval_interval", "eval_batches", "log_interval", "checkpoint_interval", "device", "compile", "num_threads"}
)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How to train. The MoE loss coefficients live in `MoEConfig` (they are part of the
    model's objective); everything about the optimisation lives here.

    ``warmup_steps`` of linear warmup to ``lr``, then cosine decay to ``lr * min_lr_ratio``
    at ``steps``. ``weight_decay`` applies to matrices only (not norms, biases, or the
    router's expert bias, which is a buffer). ``grad_clip=0`` disables clipping.
    ``eval_interval``/``checkpoint_interval`` of 0 mean only at the end. ``eval_batches`` is
    per domain. ``num_threads=None`` leaves torch's thread count alone.
    """

    # Defaults: the comparison scale, ~2-3 minutes per tiny model on 2 CPU cores
    # (BENCHMARKS.md, "MoE vs dense").
    steps: int = 600
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    eval_interval: int = 25
    eval_batches: int = 4
    log_interval: int = 10
    checkpoint_interval: int = 100
    device: str = "auto"
    precision: str = "auto"  # "auto": bf16 autocast on CUDA and on CPUs with native bf16 (module docstring)
    compile: bool = False
    num_threads: int | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_batches", "log_interval"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("warmup_steps", "seed", "eval_interval", "checkpoint_interval"):
            _check_int(name, getattr(self, name), minimum=0)
        if self.num_threads is not None:
            _check_int("num_threads", self.num_threads, minimum=1)
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"TrainConfig.lr must be a finite number > 0, got {self.lr!r}")
        if not (isinstance(self.min_lr_ratio, int | float) and 0 <= self.min_lr_ratio <= 1):
            raise ConfigError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        for name in ("weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"TrainConfig.{name} must be a finite number >= 0, got {value!r}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0 <= value < 1):
                raise ConfigError(f"TrainConfig.{name} must be in [0, 1), got {value!r}")
        if self.device not in DEVICES:
            raise ConfigError(f"TrainConfig.device={self.device!r} is unknown; choose one of {DEVICES}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"TrainConfig.precision={self.precision!r} is unknown; choose one of {PRECISIONS}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"TrainConfig: unknown field(s) {sorted(unknown)}; known fields are {sorted(known)}")
        return cls(**d)


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"TrainConfig.{name} must be an integer >= {minimum}, got {value!r}")


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT during `train`: the run stopped after `step`, checkpointed in `run_dir`."""

    def __init__(self, run_dir: Path, step: int) -> None:
        super().__init__(f"interrupted at step {step}; checkpoint written in {run_dir}")
        self.run_dir, self.step = run_dir, step


class _DeferredSigint:
    """While active (main thread only), the first SIGINT sets `requested`; the second one
    raises KeyboardInterrupt as usual."""

    def __init__(self, enabled: bool = True) -> None:
        self.requested = False
        self.enabled = enabled
        self._previous: Any = None

    def __enter__(self) -> _DeferredSigint:
        if self.enabled and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("interrupt: finishing this step, then writing a checkpoint (Ctrl-C again to stop at once)")

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class Parallel(Protocol):
    """What a multi-process run changes in the loop; `moelab.dist.train.ExpertParallel`
    implements it (the trainer sits below `dist` and never imports it). ``None``: one
    process. Every rank runs the same loop; only the main rank writes files and shows
    progress. Each rank's loss is its share of the global loss, so the shares' gradients,
    reduced by `finish_backward`, are the one-process gradients of the global batch."""

    is_main: bool
    world_size: int

    def prepare(self, model: Transformer) -> None: ...  # before the optimizer is built

    def shard_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def loss_share(self, out: Any, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(this rank's share of the loss, its share of the LM loss)."""
        ...

    def finish_backward(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Reduce the gradients, clip them, return the global gradient norm."""
        ...

    def all_sum(self, values: list[float]) -> list[float]: ...

    def save_checkpoint(self, run_dir: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
                        state: dict) -> None: ...

    def load_checkpoint(self, run_dir: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict: ...


@dataclass
class TrainResult:
    steps_done: int
    val_loss: float | None  # at the last evaluation (None if the run stopped before any)
    val_loss_by_domain: dict[str, float]
    tokens_per_s: float  # median over steady-state steps (the first few are warm-up)
    step_time_s: float  # median seconds per optimizer step (data + forward + backward + update)
    history: list[dict] = field(default_factory=list)  # eval rows: {"step", "val_loss", "val_loss_by_domain"}
    stopped_reason: str | None = None
    nan_steps: int = 0
    out_dir: Path | None = None
    num_params: int = 0
    # True when a resume found the run already at `steps`: nothing was trained or written.
    already_done: bool = False
    threads: int = 0  # torch's compute threads during the run
    load_avg: float | None = None  # median 1-minute load average over the steps: what the timings were measured under


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup from lr/warmup to lr
    over `warmup_steps`, then half a cosine from lr down to lr * min_lr_ratio at `steps`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    min_lr = cfg.lr * cfg.min_lr_ratio
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: TrainConfig, *, fused: bool = False) -> torch.optim.AdamW:
    """AdamW with two groups: matrices (decayed) and vectors (norm weights, biases: not
    decayed; shrinking a norm gain towards 0 only fights the loss)."""
    decay, no_decay = [], []
    for p in model.parameters():  # `parameters()` yields a tied weight once
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs: dict[str, Any] = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, **kwargs)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("TrainConfig.device='cuda' but no CUDA device is available; use 'cpu' or 'auto'")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def describe_data(data: PreparedData) -> dict:
    return {
        "fingerprint": data.fingerprint,
        "domains": list(data.domains),
        "vocab_size": data.vocab_size,
        "train_tokens": {d: int(len(a)) for d, a in data.train.items()},
        "val_tokens": {d: int(len(a)) for d, a in data.val.items()},
        "config": data.meta.get("config"),
    }


def evaluate(
    model: nn.Module,
    batches_by_domain: dict[str, list[tuple[torch.Tensor, torch.Tensor]]],
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager],
    parallel: Parallel | None = None,
) -> tuple[float, dict[str, float]]:
    """(overall, per-domain) validation LM loss; overall is token-weighted (module docstring).
    With `parallel`, each rank evaluates its rows of every batch and the sums are shared."""
    loss, by_domain, _ = evaluate_with_load(model, batches_by_domain, device, autocast, parallel)
    return loss, by_domain


@torch.no_grad()
def evaluate_with_load(
    model: nn.Module,
    batches_by_domain: dict[str, list[tuple[torch.Tensor, torch.Tensor]]],
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager],
    parallel: Parallel | None = None,
) -> tuple[float, dict[str, float], dict[str, list[float]]]:
    """`evaluate`, plus each MoE layer's expert load on the validation tokens: ``{layer:
    [share of assignments per expert]}`` (1/E each when balanced). Every eval row records
    it, so a run (a fine-tuning above all) shows how its balance drifts. (Under expert
    parallelism the routing stats are already the global batch's.)"""
    was_training = model.training
    model.eval()
    total_loss, total_tokens = 0.0, 0
    by_domain: dict[str, float] = {}
    load: dict[int, torch.Tensor] = {}
    try:
        for domain, batches in batches_by_domain.items():
            d_loss, d_tokens = 0.0, 0
            for x, y in batches:
                if parallel is not None:
                    x, y = parallel.shard_batch(x, y)
                x, y = x.to(device), y.to(device)
                with autocast():
                    out = model(x, targets=y, return_logits=False)
                for layer, stats in out.layer_stats.items():
                    counts = stats.tokens_per_expert.detach().to("cpu", torch.float64)
                    load[layer] = load[layer] + counts if layer in load else counts
                n = int((y != -100).sum())
                d_loss += float(out.lm_loss) * n
                d_tokens += n
            if parallel is not None:
                d_loss, d_tokens = parallel.all_sum([d_loss, float(d_tokens)])
            by_domain[domain] = d_loss / max(1, d_tokens)
            total_loss += d_loss
            total_tokens += d_tokens
    finally:
        model.train(was_training)
    shares = {str(layer): (c / c.sum().clamp_min(1)).tolist() for layer, c in sorted(load.items())}
    return total_loss / max(1, total_tokens), by_domain, shares


def _saved_with_defaults(saved: dict, run_dir: Path) -> tuple[dict, dict]:
    """The run's saved model and train configs with every field present: a run written
    before a field existed (e.g. ``precision``, ``router_dtype``) used its default."""
    model = run_files.model_config_of(saved, run_dir).to_dict()
    try:
        train_d = TrainConfig.from_dict(saved.get("train", {})).to_dict()
    except (ConfigError, TypeError, KeyError) as e:
        raise CheckpointError(f"cannot resume {run_dir}: its config.json does not describe a valid run ({e})") from None
    return model, train_d


def _check_resume(run_dir: Path, model_cfg: ModelConfig, train_cfg: TrainConfig, data: PreparedData) -> dict:
    saved = run_files.read_run_config(run_dir)
    saved_model, saved_train_all = _saved_with_defaults(saved, run_dir)
    diffs = ckpt.config_differences(saved_model, model_cfg.to_dict())
    if diffs:
        raise CheckpointError(
            f"cannot resume {run_dir}: the model config differs from the checkpoint's "
            f"({'; '.join(diffs[:5])}; checkpoint value first)"
        )
    saved_train = {k: v for k, v in saved_train_all.items() if k not in RESUMABLE_CHANGES}
    now_train = {k: v for k, v in train_cfg.to_dict().items() if k not in RESUMABLE_CHANGES}
    diffs = ckpt.config_differences(saved_train, now_train)
    if diffs:
        raise CheckpointError(
            f"cannot resume {run_dir} exactly: training settings differ from the checkpoint's "
            f"({'; '.join(diffs[:5])}; checkpoint value first)"
        )
    saved_fp = saved.get("data", {}).get("fingerprint")
    if saved_fp is not None and saved_fp != data.fingerprint:
        raise CheckpointError(
            f"cannot resume {run_dir}: it was trained on different data (fingerprint {saved_fp[:16]}, "
            f"now {data.fingerprint[:16]})"
        )
    return saved


def _copy_tokenizer(data: PreparedData, run_dir: Path) -> None:
    src = Path(data.tokenizer_path)
    if src.is_file():
        atomic_write_text(run_dir / run_files.TOKENIZER_FILE, src.read_text(encoding="utf-8"))


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"fp32"`` or ``"bf16"`` (autocast) for `TrainConfig.precision` on `device`; the
    rule for ``"auto"`` and the measurements behind it are in the module docstring."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16"
    return "bf16" if device.type == "cpu" and hardware.cpu_native_bf16() else "fp32"


def train(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    data: PreparedData,
    out_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    model: Transformer | None = None,
    on_step: Callable[[int, dict], None] | None = None,
    tensorboard: bool = True,
    overwrite: bool = False,
    source: dict | None = None,
    parallel: Parallel | None = None,
) -> TrainResult:
    """Train and write a run directory at `out_dir`; see the module docstring.

    ``model`` lets a caller pass a pre-built (e.g. specially initialised) model for
    `model_cfg`; otherwise one is built after seeding. ``on_step(step, row)`` is called
    with every training row. ``resume=True`` continues from the checkpoint in `out_dir`.
    ``source`` (with a pre-built ``model`` holding a checkpoint's weights: fine-tuning)
    goes into config.json as its "source" entry, e.g. ``{"init_from": path, "kind": ...}``.
    ``parallel`` (`Parallel`): this process is one rank of a multi-process run.
    """
    main = parallel is None or parallel.is_main
    run_dir = Path(out_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is a file, not a folder; choose a folder for the run (--out)")
    if data.vocab_size > model_cfg.vocab_size:
        raise ConfigError(
            f"ModelConfig.vocab_size={model_cfg.vocab_size} is smaller than the data's tokenizer "
            f"vocabulary ({data.vocab_size}); use a model with vocab_size >= {data.vocab_size}"
        )
    if model is not None and model.cfg != model_cfg:
        raise ConfigError("train(model=...) was built from a different ModelConfig than model_cfg")
    if train_cfg.seq_len > model_cfg.max_seq_len:
        raise ConfigError(
            f"TrainConfig.seq_len={train_cfg.seq_len} exceeds ModelConfig.max_seq_len={model_cfg.max_seq_len}"
        )
    aside: Path | None = None  # the previous run, moved aside by overwrite until this one has started
    if resume:
        _check_resume(run_dir, model_cfg, train_cfg, data)  # a missing or broken config.json: its own error
        if not (run_dir / run_files.STATE_FILE).is_file():
            raise CheckpointError(
                f"{run_dir} holds a run that stopped before its first checkpoint: there is nothing to resume; "
                "start it again with overwrite=True (--overwrite)"
            )
        done = _already_done(run_dir, train_cfg, model_cfg)
        if done is not None:
            return done
    elif main and _holds_a_run(run_dir):  # only the main rank touches the folder
        if not overwrite:
            raise ConfigError(_holds_a_run_message(run_dir))
        aside = _move_aside(run_dir)
    try:
        return _train(model_cfg, train_cfg, data, run_dir, resume=resume, progress=progress, model=model,
                      on_step=on_step, tensorboard=tensorboard, aside=aside, source=source, parallel=parallel)
    finally:
        if aside is not None and aside.exists():  # the new run failed before it started: put the old one back
            shutil.rmtree(run_dir, ignore_errors=True)
            os.replace(aside / run_dir.name, run_dir)
            aside.rmdir()


def _train(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    data: PreparedData,
    run_dir: Path,
    *,
    resume: bool,
    progress: bool,
    model: Transformer | None,
    on_step: Callable[[int, dict], None] | None,
    tensorboard: bool,
    aside: Path | None,
    source: dict | None,
    parallel: Parallel | None = None,
) -> TrainResult:
    main = parallel is None or parallel.is_main

    if train_cfg.num_threads is not None:
        torch.set_num_threads(train_cfg.num_threads)
    elif torch.get_num_threads() > hardware.available_cpus():  # an affinity mask or CPU quota leaves fewer
        torch.set_num_threads(hardware.available_cpus())
    threads = torch.get_num_threads()
    loads: list[float] = []
    device = resolve_device(train_cfg.device)
    seed_everything(train_cfg.seed)
    if model is None:
        model = Transformer(model_cfg)
    model.to(device).train()
    if parallel is not None:
        parallel.prepare(model)
    optimizer = build_optimizer(model, train_cfg, fused=device.type == "cuda")
    load_checkpoint = ckpt.load_checkpoint if parallel is None else parallel.load_checkpoint
    save_checkpoint = ckpt.save_checkpoint if parallel is None else parallel.save_checkpoint

    start_step = 0
    if resume:
        state = load_checkpoint(run_dir, model=model, optimizer=optimizer)
        start_step = int(state["step"])
        if main:
            truncate_metrics(run_dir / METRICS_FILE, start_step)
        logger.info("resumed %s at step %d", run_dir, start_step)
    elif main:
        run_dir.mkdir(parents=True, exist_ok=True)
        run_files.write_run_config(run_dir, model_cfg, train_cfg.to_dict(), describe_data(data), source=source)
        _copy_tokenizer(data, run_dir)
        if aside is not None:  # the new run has started: the old one goes for good
            shutil.rmtree(aside)
    if resume and main:  # a longer --steps is allowed: record the config that is now in force
        run_files.write_run_config(run_dir, model_cfg, train_cfg.to_dict(), describe_data(data),
                                   source=run_files.read_run_config(run_dir).get("source"))

    use_bf16 = resolve_precision(train_cfg.precision, device) == "bf16"
    logger.info("precision %s -> %s on %s", train_cfg.precision, "bf16 autocast" if use_bf16 else "fp32", device)

    def autocast() -> contextlib.AbstractContextManager:
        if use_bf16:
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    forward = torch.compile(model) if train_cfg.compile else model
    batcher = TokenBatcher(data.train, train_cfg.batch_size, train_cfg.seq_len, seed=train_cfg.seed)
    val = val_batches(data.val, train_cfg.batch_size, train_cfg.seq_len, max_batches_per_domain=train_cfg.eval_batches)
    moe_layers = [m for m in model.moe_layers if m.cfg.bias_update_rate > 0]
    params = [p for p in model.parameters() if p.requires_grad]
    tokens_per_step = train_cfg.batch_size * train_cfg.seq_len

    # On resume the eval rows before the checkpoint come from the log, so the result's
    # history covers the whole run.
    history: list[dict] = read_metrics(run_dir, kind="eval") if resume and (run_dir / METRICS_FILE).is_file() else []
    step_times: list[float] = []
    stopped_reason: str | None = None
    nan_steps = 0
    step = start_step
    writer = (MetricsWriter(run_dir, tensorboard=tensorboard, purge_step=start_step if resume else None) if main
              else _NullWriter())

    def run_eval(at_step: int) -> None:
        val_loss, by_domain, load = evaluate_with_load(forward, val, device, autocast, parallel)
        row = {"kind": "eval", "step": at_step, "val_loss": val_loss, "val_loss_by_domain": by_domain}
        if load:
            row["expert_load"] = load
            row["busiest_expert_share"] = max(max(s) for s in load.values())
        writer.write(row)
        history.append(row)
        logger.debug("step %d: val_loss %.4f %s", at_step, val_loss, by_domain)

    from tqdm.auto import tqdm

    bar = tqdm(total=train_cfg.steps, initial=start_step, disable=not (progress and main), desc=run_dir.name, unit="step",
               dynamic_ncols=True, leave=False)
    checkpointed_at = start_step if resume else None
    # One process: Ctrl-C finishes the step and checkpoints. Ranks of a parallel run could
    # see it at different steps and wait on each other's collectives, so there it stops at
    # once (the last checkpoint is intact) and the launcher ends every rank.
    interrupt = _DeferredSigint(enabled=parallel is None)
    try:
        interrupt.__enter__()
        if start_step == 0:
            run_eval(0)  # the starting point of every loss curve (ln V at init)
        while step < train_cfg.steps:
            if interrupt.requested:
                if checkpointed_at != step:
                    save_checkpoint(run_dir, model=model, optimizer=optimizer, step=step,
                                    state={"train_config": train_cfg.to_dict()})
                logger.info("interrupted: checkpoint at step %d written in %s", step, run_dir)
                raise TrainingInterrupted(run_dir, step)
            t0 = time.perf_counter()
            for group in optimizer.param_groups:  # a group may scale the schedule ("lr_scale")
                group["lr"] = lr_at(step, train_cfg) * group.get("lr_scale", 1.0)
            x, y = batcher.get_batch(step)
            if parallel is not None:
                x, y = parallel.shard_batch(x, y)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            try:
                with autocast():
                    out = forward(x, targets=y, return_logits=False)
                if parallel is None:
                    loss, lm_loss = out.loss, out.lm_loss
                    loss_value = float(loss.detach())
                else:  # this rank's shares; the logged values are their sums (the global losses)
                    loss, lm_loss = parallel.loss_share(out, y)
                    loss_value = parallel.all_sum([float(loss.detach())])[0]
                if not math.isfinite(loss_value):
                    raise FloatingPointError(f"loss became {loss_value} at step {step + 1}")
                loss.backward()
                max_norm = train_cfg.grad_clip if train_cfg.grad_clip > 0 else math.inf
                if parallel is None:
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
                else:
                    grad_norm = parallel.finish_backward(model, max_norm)
                if not bool(torch.isfinite(grad_norm)):
                    raise FloatingPointError(f"gradient norm became {float(grad_norm)} at step {step + 1}")
            except NonFiniteRouterError as e:
                stopped_reason = f"router logits became non-finite at step {step + 1}: {e}"
            except FloatingPointError as e:
                stopped_reason = str(e)
            if stopped_reason is not None:
                nan_steps += 1
                optimizer.zero_grad(set_to_none=True)
                logger.warning("%s: stopping; the last checkpoint is kept", stopped_reason)
                writer.write({"kind": "stop", "step": step, "reason": stopped_reason})
                break
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            layer_stats = out.layer_stats
            for layer in moe_layers:  # aux-loss-free balancing: nudge biases by this step's load
                layer.update_bias(layer_stats[_layer_index(model, layer)].tokens_per_expert)
            step += 1
            dt = time.perf_counter() - t0
            step_times.append(dt)

            losses = [loss_value, float(lm_loss.detach()), float(out.aux_loss.detach()), float(out.z_loss.detach())]
            if parallel is not None:
                losses[1:] = parallel.all_sum(losses[1:])
            row = {
                "kind": "train",
                "step": step,
                "loss": losses[0],
                "lm_loss": losses[1],
                "aux_loss": losses[2],
                "z_loss": losses[3],
                "lr": optimizer.param_groups[0]["lr"],
                "grad_norm": float(grad_norm),
                "tokens_per_s": tokens_per_step / dt,
                "step_time_s": dt,
                "threads": threads,
                "load_avg_1m": (load := hardware.load_average()),
                "layers": {str(i): s.to_dict() for i, s in layer_stats.items()},
            }
            writer.write(row)
            if load is not None:
                loads.append(load)
            if on_step is not None:
                on_step(step, row)
            bar.update(1)
            if step % train_cfg.log_interval == 0 or step == train_cfg.steps:
                postfix = {"loss": f"{row['loss']:.3f}", "tok/s": f"{row['tokens_per_s']:.0f}", "thr": threads}
                if load is not None:  # a slow run explains itself: the machine is busy
                    postfix["load"] = f"{load:.1f}"
                if layer_stats:
                    share = max(s["busiest_expert_share"] for s in row["layers"].values())
                    postfix["max_share"] = f"{share:.2f}"
                if history:
                    postfix["val"] = f"{history[-1]['val_loss']:.3f}"
                bar.set_postfix(postfix, refresh=False)
                logger.debug("step %d: %s", step, postfix)
            last = step == train_cfg.steps
            if last or (train_cfg.eval_interval and step % train_cfg.eval_interval == 0):
                run_eval(step)
            if last or (train_cfg.checkpoint_interval and step % train_cfg.checkpoint_interval == 0):
                save_checkpoint(run_dir, model=model, optimizer=optimizer, step=step,
                                state={"train_config": train_cfg.to_dict()})
                checkpointed_at = step
    finally:
        interrupt.__exit__()
        bar.close()
        writer.close()

    # Steady state: drop the first steps (allocator and thread-pool warm-up, compilation).
    skip = min(len(step_times) // 5, 10)
    steady = step_times[skip:] or step_times
    step_time = statistics.median(steady) if steady else float("nan")
    final = history[-1] if history else None
    return TrainResult(
        steps_done=step,
        val_loss=final["val_loss"] if final else None,
        val_loss_by_domain=dict(final["val_loss_by_domain"]) if final else {},
        tokens_per_s=tokens_per_step / step_time if steady else float("nan"),
        step_time_s=step_time,
        history=[_history_row(r) for r in history],
        stopped_reason=stopped_reason,
        nan_steps=nan_steps,
        out_dir=run_dir,
        num_params=model.num_params(),
        threads=threads,
        load_avg=statistics.median(loads) if loads else None,
    )


def _history_row(r: dict) -> dict:
    keep = ("step", "val_loss", "val_loss_by_domain", "busiest_expert_share", "expert_load")
    return {k: r[k] for k in keep if k in r}


def _holds_a_run(run_dir: Path) -> bool:
    return (run_dir / run_files.STATE_FILE).exists() or (run_dir / METRICS_FILE).exists() or (
        run_files.is_run_dir(run_dir))


def _holds_a_run_message(run_dir: Path) -> str:
    if not (run_dir / run_files.STATE_FILE).is_file():
        return (f"{run_dir} holds a run that stopped before its first checkpoint (nothing to resume); "
                "pass overwrite=True (--overwrite) to start it again, or choose a new output directory")
    return (f"{run_dir} already holds a run; pass resume=True (--resume) to continue it, "
            "overwrite=True (--overwrite) to replace it, or choose a new output directory")


def _move_aside(run_dir: Path) -> Path:
    """Move the run in `run_dir` to a hidden folder beside it (returned) so the new run starts
    in an empty folder: overwrite leaves nothing of the old run (analysis.json, plots/ ...)
    beside the new one. A folder that holds anything moelab does not write is refused."""
    if run_dir.resolve() in (Path.cwd().resolve(), *Path.cwd().resolve().parents):
        raise ConfigError(f"{run_dir} is the current folder (or holds it); choose a run folder for --out")
    foreign = sorted(p.name for p in run_dir.iterdir()
                     if p.name not in run_files.RUN_DIR_NAMES and not p.name.startswith("."))
    if foreign:
        raise ConfigError(
            f"{run_dir} holds files that are not a run's ({', '.join(foreign[:5])}); refusing to replace it "
            "even with --overwrite: move them, or choose a new output directory"
        )
    aside = Path(tempfile.mkdtemp(prefix=f".{run_dir.name}.", suffix=".old", dir=run_dir.parent))
    os.replace(run_dir, aside / run_dir.name)
    return aside


def _already_done(run_dir: Path, train_cfg: TrainConfig, model_cfg: ModelConfig) -> TrainResult | None:
    """On resume: None if there are steps left to train; a result (nothing written) when the
    checkpoint is already at `train_cfg.steps`. Fewer steps than the checkpoint's is an error:
    the run's history is never rewritten."""
    at = int(ckpt.read_trainer_state(run_dir)["step"])
    if train_cfg.steps > at:
        return None
    if train_cfg.steps < at:
        raise ConfigError(
            f"cannot resume {run_dir} with steps={train_cfg.steps} (--steps): its checkpoint is already at "
            f"step {at}; nothing to do (pass a larger --steps to train further)"
        )
    history = read_metrics(run_dir, kind="eval") if (run_dir / METRICS_FILE).is_file() else []
    final = history[-1] if history else None
    rows = read_metrics(run_dir, kind="train") if (run_dir / METRICS_FILE).is_file() else []
    times = [r["step_time_s"] for r in rows if "step_time_s" in r]
    step_time = statistics.median(times) if times else float("nan")
    logger.info("%s is already at step %d of %d: nothing to do", run_dir, at, train_cfg.steps)
    return TrainResult(
        steps_done=at,
        val_loss=final["val_loss"] if final else None,
        val_loss_by_domain=dict(final["val_loss_by_domain"]) if final else {},
        tokens_per_s=train_cfg.batch_size * train_cfg.seq_len / step_time if times else float("nan"),
        step_time_s=step_time,
        history=[_history_row(r) for r in history],
        out_dir=run_dir,
        num_params=_num_params(model_cfg),
        already_done=True,
    )


def _num_params(cfg: ModelConfig) -> int:
    with torch.device("meta"):  # counted without allocating or initialising anything
        return Transformer(cfg).num_params()


class _NullWriter:
    """The metrics writer of a rank that is not the main one."""

    def write(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


def _layer_index(model: Transformer, layer: nn.Module) -> int:
    for i, block in enumerate(model.layers):
        if block.mlp is layer:
            return i
    raise ValueError("MoE layer not found in model")
