"""The demo (what `make demo` runs) end to end at a tiny scale: every stage, one report,
the trade-off columns, the stated MoE design and `moelab demo --json`."""

from __future__ import annotations

import functools
import json

import pytest

from moelab.cli.main import main
from moelab.errors import ConfigError
from moelab.lab.demo import DEMO_MODELS, DemoConfig, demo_models, demo_train_config, run_demo
from moelab.lab.failures import SCALES
from moelab.lab.report import SECTIONS
from moelab.model import get_preset
from moelab.train import TrainConfig

TINY = dict(compare_steps=2, batch_size=2, seq_len=32, eval_interval=1, eval_batches=1,
            collapse=SCALES["test"].with_(steps=4), analysis_tokens=64)


def test_the_demo_moe_is_the_stated_design():
    """Fine-grained + shared experts (DeepSeekMoE) against the dense model of its active
    width, with the Mixtral-style top-2 of 8 beside it."""
    models = demo_models(DemoConfig())
    assert {role: name for role, (name, _) in models.items()} == DEMO_MODELS
    moe, dense, coarse = (models[r][1] for r in ("moe", "dense", "moe_coarse"))
    assert moe.moe.num_shared_experts >= 1 and moe.moe.num_experts > coarse.moe.num_experts
    assert moe.moe.top_k > coarse.moe.top_k and moe.moe.d_expert < coarse.moe.d_expert
    active = moe.moe.top_k * moe.moe.d_expert + moe.moe.num_shared_experts * moe.moe.d_shared_expert
    assert dense.moe is None and dense.d_ff == active == coarse.moe.top_k * coarse.moe.d_expert
    assert (coarse.moe.num_experts, coarse.moe.top_k) == (8, 2)
    assert "dense_total" not in models and "dense_total" in demo_models(DemoConfig(dense_total=True))


def test_the_demo_trains_what_the_benchmark_measured():
    # BENCHMARKS.md "The demo's MoE" ran `moelab compare` / the sweep with TrainConfig's
    # defaults in fp32; the demo must train with the same maths.
    ours = demo_train_config(DemoConfig()).to_dict()
    theirs = TrainConfig(precision="fp32").to_dict()
    maths = ("steps", "batch_size", "seq_len", "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "beta1",
             "beta2", "grad_clip", "seed", "eval_interval", "eval_batches", "precision")
    assert {k: ours[k] for k in maths} == {k: theirs[k] for k in maths}


@pytest.mark.slow
def test_demo_runs_every_stage_and_writes_the_report(tmp_path):
    cfg = DemoConfig(**TINY, workers=1)  # in this process (the --json test below runs its default workers)
    stages: list[str] = []
    texts: dict[str, str] = {}

    def on_stage(name: str, text: str) -> None:
        stages.append(name.split(":")[0])
        texts[stages[-1]] = text

    result = run_demo(tmp_path / "demo", config=cfg, cache_dir=tmp_path / "cache", progress=False,
                      on_stage=on_stage)
    assert stages == ["size", "data", "compare", "lab collapse", "analyze"]
    assert set(result.comparison.models) == {"moe", "dense", "moe_coarse"}
    # The MoE row is the stated design: its run holds the preset's config.
    moe = result.comparison.models["moe"]
    assert moe.name == DEMO_MODELS["moe"]
    saved = json.loads((tmp_path / "demo" / "compare" / moe.name / "config.json").read_text())
    assert saved["model"] == get_preset(DEMO_MODELS["moe"]).to_dict()
    # The comparison table has the quality-per-FLOP and quality-per-byte columns, and says why top-2 trails.
    header = [h.strip() for h in texts["compare"].splitlines()[0].split("  ") if h.strip()]
    assert {"nats/TFLOP", "nats/MiB", "steps to dense loss"} <= set(header)
    assert "top-2 of 8" in texts["compare"]
    assert set(result.collapse.runs) == set(cfg.collapse_runs)
    html = result.report.read_text(encoding="utf-8")
    for section in SECTIONS:
        assert f'id="{section}"' in html
    assert "mixtral-8x7b" in html and "<th>nats/TFLOP</th>" in html and "<th>nats/MiB</th>" in html
    assert (tmp_path / "demo" / "compare" / moe.name / "analysis.json").is_file()
    assert set(result.seconds) == {"size", "data", "compare", "collapse", "analyze", "report", "total"}


@pytest.mark.slow
def test_demo_json_is_one_object_with_the_documented_keys(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("moelab.cli.demo.DemoConfig", functools.partial(DemoConfig, **TINY))
    assert main(["demo", "--json", "--no-progress", "--out", str(tmp_path / "demo"),
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)  # stdout is the JSON object and nothing else
    assert "=== compare" in captured.err
    assert set(out) == {"format", "version", "compare", "collapse", "seconds", "report"}
    assert out["format"] == "moelab-demo" and out["version"] == 1
    cmp = out["compare"]
    assert cmp["roles"] == {role: name for role, name in DEMO_MODELS.items()}
    for name, m in cmp["models"].items():
        assert {"role", "moe", "val_loss", "steps_to_dense_loss_ratio", "quality_per_tflop", "quality_per_mib",
                "total_params", "active_params", "train_flops", "weight_bytes", "steps_done"} <= set(m)
        assert (m["moe"] is None) == (m["role"] == "dense"), name
    assert cmp["models"][DEMO_MODELS["moe"]]["moe"]["num_shared_experts"] >= 1
    assert cmp["dense_final_val_loss"] == cmp["models"][DEMO_MODELS["dense"]]["val_loss"]
    # The collapse runs' figures are the experiment's own JSON summary.
    assert set(out["collapse"]["runs"]) == set(DemoConfig().collapse_runs)
    assert {"val_loss", "busiest_expert_share"} <= set(next(iter(out["collapse"]["runs"].values())))
    assert set(out["seconds"]) == {"size", "data", "compare", "collapse", "analyze", "report", "total"}
    assert out["seconds"]["total"] >= out["seconds"]["compare"] > 0


def test_demo_config_rejects_bad_sizes():
    with pytest.raises(ConfigError, match="compare_steps"):
        DemoConfig(compare_steps=0)
    with pytest.raises(ConfigError, match="precision"):
        DemoConfig(precision="fp16")
    with pytest.raises(ConfigError, match="workers"):
        DemoConfig(workers=0)


def test_demo_cli_rejects_bad_flags_in_one_line(capsys):
    assert main(["demo", "--steps", "0"]) == 2
    err = capsys.readouterr().err
    assert "--steps must be >= 1" in err and "Traceback" not in err
    assert main(["demo", "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "--workers must be >= 1" in err and "Traceback" not in err


def test_demo_json_has_no_nan_anywhere():
    from moelab.lab.demo import _json_safe

    assert _json_safe({"a": [1.0, float("nan")], "b": {"c": float("inf"), "d": "x", "e": 2}}) == \
        {"a": [1.0, None], "b": {"c": None, "d": "x", "e": 2}}
