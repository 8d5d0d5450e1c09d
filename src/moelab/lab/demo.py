"""`run_demo`: the whole moelab story in one command (what `make demo` runs).

1. `moelab size` of Mixtral 8x7B against a dense 13B (instant);
2. train the tiny MoE, its matched-compute dense baseline and the matched-parameter dense
   model on the same batches, and compare them (`moelab.train.compare`);
3. a short routing-collapse experiment (`moelab.lab.failures`);
4. the MoE's expert specialisation on held-out text (`moelab.lab.specialization`);
5. one self-contained HTML report (`moelab.lab.report`).

Sized for < ~10 minutes on 2 CPU cores including building the corpus and tokenizer on the
first run (later runs reuse the cache). Each step is a library call whose result is
returned in `DemoResult`; `on_stage(name, text)` receives each stage's printable output
as soon as it is ready (the CLI prints it), since the library itself never prints.
"""

from __future__ import annotations

import logging
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


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """Scale of the demo. The defaults fit the ~10 minute budget on 2 CPU cores."""

    # ~5 minutes in all on 2 CPU cores (compare ~4, collapse ~1). The collapse experiment
    # runs at the lab's default scale: at the "quick" scale (80 steps) the aux-loss cure
    # has not yet revived the starved experts, so the demo would show no cure.
    compare_steps: int = 240
    batch_size: int = 16
    seq_len: int = 128
    eval_interval: int = 20
    eval_batches: int = 2
    dense_total: bool = True
    # Collapse: the default lab scale (150 steps) and the four runs its verdict needs most
    # (collapse, both cures and their costs, the dense twin): ~1.5-2 minutes on 2 quiet
    # cores. The horizon where the balanced MoE passes the collapsed one (300-400 steps
    # of the `long` scale) does not fit the demo; its rule 5 says so, docs/lab.md has the curve.
    collapse: LabConfig = field(default_factory=lambda: SCALES["default"])
    collapse_runs: tuple[str, ...] = ("broken-no-aux", "aux-loss", "aux-free-bias", "dense-active")
    analysis_tokens: int = 4096
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("compare_steps", "batch_size", "seq_len", "eval_batches", "analysis_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"DemoConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.eval_interval, int) or self.eval_interval < 0:
            raise ConfigError(f"DemoConfig.eval_interval must be an integer >= 0, got {self.eval_interval!r}")


@dataclass
class DemoResult:
    out_dir: Path
    report: Path
    size_table: str
    comparison: Any  # moelab.train.compare.ComparisonResult
    collapse: Any  # moelab.lab.failures.ExperimentResult
    analysis: Any  # moelab.lab.specialization.SpecializationResult
    seconds: dict[str, float] = field(default_factory=dict)


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
) -> DemoResult:
    """Run the five demo stages into `out_dir`; see the module docstring."""
    from moelab.data.loader import prepare_data
    from moelab.hf.native import load_any
    from moelab.model import get_preset
    from moelab.train import TrainConfig
    from moelab.train.compare import compare, render_table

    cfg = config or DemoConfig()
    out = Path(out_dir)
    emit = on_stage or (lambda name, text: None)
    seconds: dict[str, float] = {}

    t = time.perf_counter()
    sizes = size_table()
    seconds["size"] = time.perf_counter() - t
    emit("size: Mixtral 8x7B vs a dense 13B", sizes)

    t = time.perf_counter()
    data = prepare_data(cache_dir)
    seconds["data"] = time.perf_counter() - t
    emit("data", f"{'cached' if data.from_cache else 'built'} corpus + tokenizer: domains {', '.join(data.domains)}, "
                 f"vocab {data.vocab_size} ({seconds['data']:.1f} s)")

    t = time.perf_counter()
    train_cfg = TrainConfig(steps=cfg.compare_steps, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                            eval_interval=cfg.eval_interval, eval_batches=cfg.eval_batches, seed=cfg.seed,
                            warmup_steps=max(1, cfg.compare_steps // 10), checkpoint_interval=0,
                            log_interval=max(1, cfg.compare_steps // 20))
    models = {"moe": ("tiny-moe", get_preset("tiny-moe")), "dense": ("tiny-dense", get_preset("tiny-dense"))}
    if cfg.dense_total:
        models["dense_total"] = ("tiny-dense-total", get_preset("tiny-dense-total"))
    comparison = compare(models, train_cfg, data, out / "compare", progress=progress, overwrite=True,
                         tensorboard=False)
    seconds["compare"] = time.perf_counter() - t
    emit("compare: tiny MoE vs dense baselines (same batches)", render_table(comparison))

    t = time.perf_counter()
    lab_cfg = replace(cfg.collapse, seed=cfg.seed)
    collapse = run_experiment("collapse", data, out / "lab" / "collapse", config=lab_cfg, progress=progress,
                              only=cfg.collapse_runs)
    seconds["collapse"] = time.perf_counter() - t
    emit("lab collapse: no balancing loss vs the cures",
         verdict_table(collapse) + "\n\n" + "\n".join(f"- {v}" for v in collapse.verdicts)
         + f"\n\ncollapse and cures {'shown as claimed' if collapse.passed else 'NOT shown at this scale'}")

    t = time.perf_counter()
    moe_dir = out / "compare" / "tiny-moe"
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
                        ("MoE vs dense (same token stream)", render_table(comparison))],
    )
    seconds["report"] = time.perf_counter() - t
    return DemoResult(out_dir=out, report=report, size_table=sizes, comparison=comparison, collapse=collapse,
                      analysis=analysis, seconds=seconds)
