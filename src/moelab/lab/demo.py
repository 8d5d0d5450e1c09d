"""`run_demo`: the whole moelab story in one command (what `make demo` runs).

1. `moelab size` of Mixtral 8x7B against a dense 13B (instant);
2. train the demo's MoE (fine-grained + shared experts, the design that wins at this
   budget), its matched-compute dense twin and the Mixtral-style top-2-of-8 MoE on the
   same batches, and compare them (`moelab.train.compare`), with quality per FLOP and
   per byte of weights side by side;
3. a short routing-collapse experiment (`moelab.lab.failures`);
4. the MoE's expert specialisation on held-out text (`moelab.lab.specialization`);
5. one self-contained HTML report (`moelab.lab.report`).

Aimed at ~10 minutes on 2 CPU cores; measured 5.9 minutes (356 s, the comparison 303 s
of them) with the models trained side by side (`DemoConfig.workers`), against 12.1
minutes one after the other (BENCHMARKS.md, "The demo's MoE"), plus building the corpus
and tokenizer on the first run (later runs reuse the cache). Each step is a library call whose result is
returned in `DemoResult`; `on_stage(name, text)` receives each stage's printable output
as soon as it is ready (the CLI prints it), since the library itself never prints.
`demo_json` is the `moelab demo --json` object (keys in docs/train.md, "The demo").

What the demo compares and how it trains (`DEMO_MODELS`, `demo_train_config`: the presets
and `TrainConfig`'s defaults in fp32) is what BENCHMARKS.md ("The demo's MoE") measured
with `moelab compare --seeds` and `benchmarks/sweep.py`; `benchmarks/demo_seeds.py`
reruns exactly this comparison over seeds.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from moelab.errors import ConfigError
from moelab.lab.failures import SCALES, LabConfig, run_experiment, verdict_table
from moelab.lab.report import build_report
from moelab.lab.specialization import AnalysisConfig, analyze_model, summary_lines, write_analysis

logger = logging.getLogger(__name__)

# The compared models by role (`moelab.train.compare.ROLES`), presets in moelab.model.presets:
# the fine-grained + shared MoE that beats its dense twin at this budget (DeepSeekMoE's
# design), the dense model of the same active FFN width, and Mixtral-style top-2 of 8.
DEMO_MODELS: dict[str, str] = {"moe": "tiny-finegrained-moe", "dense": "tiny-dense", "moe_coarse": "tiny-moe"}
DENSE_TOTAL = "tiny-dense-total"

# The one sentence on why top-2 of 8 needs more tokens (BENCHMARKS.md, "Where does the MoE win?").
TOP2_NOTE = (
    "Why top-2 of 8 needs more tokens: all of its active width is routed, so each of its FFN weights learns "
    "from only a quarter of the tokens where the dense twin's learn from all of them, and at this budget the "
    "extra capacity does not yet pay for that; the fine-grained MoE keeps half its active width in a shared "
    "expert that sees every token and spends the other half on 4 of 32 narrow experts (DeepSeekMoE).")


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """Scale of the demo. The defaults aim at ~10 minutes on 2 CPU cores (measured: 5.9)."""

    # The comparison: 303 s for the three models side by side on 2 cores (619 s one after
    # the other at 1 thread; BENCHMARKS.md). The collapse
    # experiment runs at the lab's default scale: at the "quick" scale (80 steps) the
    # aux-loss cure has not yet revived the starved experts, so the demo would show no cure.
    compare_steps: int = 600
    batch_size: int = 8
    seq_len: int = 128
    eval_interval: int = 25
    eval_batches: int = 4
    # fp32: on this AVX512-BF16 CPU bf16 autocast made the fine-grained MoE's step slower
    # (its experts are only 64 wide) and the dense one faster, interleaved in one process,
    # so it buys no tokens for the three models together (BENCHMARKS.md, "The demo's MoE").
    precision: str = "fp32"
    moe_coarse: bool = True  # the Mixtral-style top-2 row
    dense_total: bool = False  # the dense model with all the experts' width (+~40% compare time)
    # Collapse: the default lab scale (150 steps) and the four runs its verdict needs most
    # (collapse, both cures and their costs, the dense twin): 47 s on 2 cores side by side.
    # The horizon where the balanced MoE passes the collapsed one (300-400 steps of the
    # `long` scale's 1000) does not fit the demo: a 400-step run of its own schedule still
    # leaves the collapsed run 0.004 ahead; rule 5 says so, docs/lab.md has both.
    collapse: LabConfig = field(default_factory=lambda: SCALES["default"])
    collapse_runs: tuple[str, ...] = ("broken-no-aux", "aux-loss", "aux-free-bias", "dense-active")
    analysis_tokens: int = 4096
    seed: int = 0
    # The compared models train side by side (`moelab.train.workers`): at this size one
    # process does not use two cores well. None: every compared model in its own process
    # at once, sharing run_demo's `threads` (at least 1 each: on 2 cores the three models
    # are time-sliced and finish together, 53.6 s against 66.6 s for two workers and the
    # third model after them, measured at 100 steps); the collapse runs one worker per
    # thread. N: N workers for both stages; 1: in this process, one after the other.
    workers: int | None = None

    def __post_init__(self) -> None:
        for name in ("compare_steps", "batch_size", "seq_len", "eval_batches", "analysis_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"DemoConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.eval_interval, int) or self.eval_interval < 0:
            raise ConfigError(f"DemoConfig.eval_interval must be an integer >= 0, got {self.eval_interval!r}")
        if self.workers is not None and (not isinstance(self.workers, int) or isinstance(self.workers, bool)
                                         or self.workers < 1):
            raise ConfigError(f"DemoConfig.workers must be a positive integer or None, got {self.workers!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"DemoConfig.precision must be 'auto', 'fp32' or 'bf16', got {self.precision!r}")


def demo_models(cfg: DemoConfig) -> dict[str, tuple[str, Any]]:
    """``{role: (preset name, ModelConfig)}`` of the demo's comparison."""
    from moelab.model import get_preset

    roles = dict(DEMO_MODELS)
    if not cfg.moe_coarse:
        roles.pop("moe_coarse")
    if cfg.dense_total:
        roles["dense_total"] = DENSE_TOTAL
    return {role: (name, get_preset(name)) for role, name in roles.items()}


def demo_train_config(cfg: DemoConfig) -> Any:
    """The `TrainConfig` every compared model trains with (same seed, same batches)."""
    from moelab.train import TrainConfig

    return TrainConfig(steps=cfg.compare_steps, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                       eval_interval=cfg.eval_interval, eval_batches=cfg.eval_batches, seed=cfg.seed,
                       precision=cfg.precision, checkpoint_interval=0,
                       log_interval=max(1, cfg.compare_steps // 20))


@dataclass
class DemoResult:
    out_dir: Path
    report: Path
    size_table: str
    comparison: Any  # moelab.train.compare.ComparisonResult
    collapse: Any  # moelab.lab.failures.ExperimentResult
    analysis: Any  # moelab.lab.specialization.SpecializationResult
    seconds: dict[str, float] = field(default_factory=dict)  # per stage, and "total"


def collapse_summary(collapse: Any) -> str:
    """One line: which of the collapse verdict's rules this scale shows, and which it does not."""
    from moelab.lab.experiments.collapse import RULES

    if collapse.passed:
        return "every lesson shown: " + "; ".join(RULES.values())
    held = [f"[{n}] {RULES[n]}" for n in RULES if collapse.rules.get(n)]
    missed = [f"[{n}] {RULES[n]}" for n in RULES if not collapse.rules.get(n)]
    return (f"shown at this scale: {', '.join(held) or 'none'}. NOT shown: {', '.join(missed)}"
            + (" (the capacity collapse wastes shows at a longer horizon: `moelab lab collapse --scale long`, "
               "docs/lab.md)" if not collapse.rules.get(5) else ""))


def _compare_workers(cfg: DemoConfig, n_models: int, threads: int | None) -> int:
    """`DemoConfig.workers` for the comparison: None is every model at once, unless there
    is a single thread to run them on."""
    from moelab import hardware

    if cfg.workers is not None:
        return cfg.workers
    return n_models if (threads or hardware.available_cpus()) > 1 else 1


def size_table(models: tuple[str, ...] = ("mixtral-8x7b", "dense-13b")) -> str:
    """The `moelab size` table for `models` (the same library calls as the CLI)."""
    from moelab.accounting.report import render_table, resolve, size_report

    reports = []
    for name in models:
        spec, source, preset = resolve(name)
        reports.append(size_report(spec, source=source, preset=preset, dtype="bf16", context=4096, batch=1,
                                   gpu_memory_gb=80.0))
    return render_table(reports)


def run_demo(
    out_dir: str | Path = "runs/demo",
    *,
    config: DemoConfig | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    on_stage: Callable[[str, str], None] | None = None,
    threads: int | None = None,
) -> DemoResult:
    """Run the five demo stages into `out_dir`; see the module docstring. `threads`: the
    CPU threads the training stages share among their workers (default: the cores)."""
    from moelab.data.loader import prepare_data
    from moelab.hf.native import load_any
    from moelab.train.compare import compare, render_table

    cfg = config or DemoConfig()
    out = Path(out_dir)
    emit = on_stage or (lambda name, text: None)
    seconds: dict[str, float] = {}

    start = t = time.perf_counter()
    sizes = size_table()
    seconds["size"] = time.perf_counter() - t
    emit("size: Mixtral 8x7B vs a dense 13B", sizes)

    t = time.perf_counter()
    data = prepare_data(cache_dir)
    seconds["data"] = time.perf_counter() - t
    emit("data", f"{'cached' if data.from_cache else 'built'} corpus + tokenizer: domains {', '.join(data.domains)}, "
                 f"vocab {data.vocab_size} ({seconds['data']:.1f} s)")

    t = time.perf_counter()
    models = demo_models(cfg)
    comparison = compare(models, demo_train_config(cfg), data, out / "compare", progress=progress, overwrite=True,
                         tensorboard=False, workers=_compare_workers(cfg, len(models), threads), threads=threads)
    seconds["compare"] = time.perf_counter() - t
    compare_text = render_table(comparison) + ("\n\n" + TOP2_NOTE if "moe_coarse" in models else "")
    emit("compare: fine-grained MoE vs its dense twin and top-2 of 8 (same batches)", compare_text)

    t = time.perf_counter()
    lab_cfg = replace(cfg.collapse, seed=cfg.seed)
    collapse = run_experiment("collapse", data, out / "lab" / "collapse", config=lab_cfg, progress=progress,
                              only=cfg.collapse_runs, workers=cfg.workers, threads=threads)
    seconds["collapse"] = time.perf_counter() - t
    emit("lab collapse: no balancing loss vs the cures",
         verdict_table(collapse) + "\n\n" + "\n".join(f"- {v}" for v in collapse.verdicts)
         + "\n\n" + collapse_summary(collapse))

    t = time.perf_counter()
    moe_dir = out / "compare" / models["moe"][0]
    loaded = load_any(moe_dir)
    from moelab.lab.specialization import held_out_tokens

    tokens = held_out_tokens(data, None, cfg.analysis_tokens)
    analysis = analyze_model(loaded.model, tokens, tokenizer=data.tokenizer,
                             config=AnalysisConfig(tokens_per_domain=cfg.analysis_tokens), source=str(moe_dir))
    write_analysis(analysis, moe_dir)
    seconds["analyze"] = time.perf_counter() - t
    emit("analyze: tiny MoE expert specialisation", "\n".join(summary_lines(analysis)))

    t = time.perf_counter()
    report = build_report(
        [out / "compare", out / "lab"], out / "report.html", title="moelab demo",
        summary_blocks=[("moelab size: Mixtral 8x7B vs dense 13B", sizes),
                        ("MoE vs dense (same token stream)", compare_text)],
    )
    seconds["report"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - start
    return DemoResult(out_dir=out, report=report, size_table=sizes, comparison=comparison, collapse=collapse,
                      analysis=analysis, seconds=seconds)


DEMO_JSON_FORMAT = "moelab-demo"


def _finite(x: float | None) -> float | None:
    # JSON has no NaN/Infinity: a diverged run's loss is reported as null.
    return x if x is None or math.isfinite(x) else None


def _json_safe(obj: Any) -> Any:
    """`obj` with every non-finite float (anywhere, e.g. in the collapse runs' figures) as None."""
    if isinstance(obj, float):
        return _finite(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def demo_json(result: DemoResult) -> dict[str, Any]:
    """The `moelab demo --json` object (keys documented in docs/train.md, "The demo").

    ``compare.models``, by model name: role, the MoE design (for an MoE), val loss, the
    steps to reach the dense model's final val loss / dense steps (null: never), quality
    per training TFLOP and per MiB of weights (`moelab.train.compare`); ``collapse`` is
    `ExperimentResult.json_summary()` as it is (each run's measured figures);
    ``seconds``: wall time per stage and in total. Non-finite floats become None (JSON
    has no NaN), so the object always serialises as strict JSON."""
    cmp = result.comparison
    models = {}
    for role, m in cmp.models.items():
        moe_cfg = m.run_dir and _moe_design(m.run_dir)
        models[m.name] = {
            "role": role,
            "moe": moe_cfg or None,
            "val_loss": _finite(m.val_loss),
            "steps_to_dense_loss_ratio": m.steps_to_dense_loss_ratio,
            "quality_per_tflop": _finite(m.quality_per_tflop),
            "quality_per_mib": _finite(m.quality_per_mib),
            "total_params": m.total_params,
            "active_params": m.active_params,
            "train_flops": m.train_flops,
            "weight_bytes": m.weight_bytes,
            "steps_done": m.steps_done,
        }
    return _json_safe({
        "format": DEMO_JSON_FORMAT,
        "version": 1,
        "compare": {
            "roles": {role: m.name for role, m in cmp.models.items()},
            "dense_final_val_loss": _finite(cmp.models["dense"].val_loss),
            "models": models,
            "train_config": cmp.train_config,
        },
        "collapse": result.collapse.json_summary(),
        "seconds": dict(result.seconds),
        "report": str(result.report),
    })


_DESIGN_KEYS = ("num_experts", "top_k", "d_expert", "num_shared_experts", "d_shared_expert")


def _moe_design(run_dir: str) -> dict[str, Any] | None:
    """The routed/shared expert shape of the model trained in `run_dir` (None: dense)."""
    from moelab.rundir.files import read_run_config

    moe = read_run_config(run_dir)["model"].get("moe")
    return None if moe is None else {k: moe.get(k) for k in _DESIGN_KEYS}
