"""The demo (what `make demo` runs) end to end at a tiny scale: every stage, one report."""

from __future__ import annotations

import pytest

from moelab.errors import ConfigError
from moelab.lab.demo import DemoConfig, run_demo
from moelab.lab.failures import SCALES
from moelab.lab.report import SECTIONS


@pytest.mark.slow
def test_demo_runs_every_stage_and_writes_the_report(tmp_path):
    cfg = DemoConfig(compare_steps=2, batch_size=2, seq_len=32, eval_interval=0, eval_batches=1,
                     collapse=SCALES["test"].with_(steps=4), analysis_tokens=64)
    stages: list[str] = []
    result = run_demo(tmp_path / "demo", config=cfg, cache_dir=tmp_path / "cache", progress=False,
                      on_stage=lambda name, text: stages.append(name.split(":")[0]))
    assert stages == ["size", "data", "compare", "lab collapse", "analyze"]
    assert set(result.comparison.models) == {"moe", "dense", "dense_total"}
    assert set(result.collapse.runs) == set(cfg.collapse_runs)
    html = result.report.read_text(encoding="utf-8")
    for section in SECTIONS:
        assert f'id="{section}"' in html
    assert "mixtral-8x7b" in html and "tiny-dense-total" in html
    assert (tmp_path / "demo" / "compare" / "tiny-moe" / "analysis.json").is_file()


def test_demo_config_rejects_bad_sizes():
    with pytest.raises(ConfigError, match="compare_steps"):
        DemoConfig(compare_steps=0)
