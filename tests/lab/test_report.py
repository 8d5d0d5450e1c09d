"""The HTML report: one file, no external references, every section; and the CLIs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from moelab.cli.main import main
from moelab.errors import DataError
from moelab.lab.failures import load_experiment, run_experiment
from moelab.lab.report import SECTIONS, build_report
from moelab.lab.specialization import AnalysisConfig, analyze_checkpoint


@pytest.fixture(scope="module")
def lab_dir(data, lab_cfg, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lab") / "capacity"
    run_experiment("capacity", data, out, config=lab_cfg.with_(steps=6, capacity_factors=(0.5, None)), progress=False)
    return out


@pytest.mark.slow
def test_report_is_one_self_contained_file_with_every_section(data, lab_dir, tmp_path) -> None:
    run = lab_dir / "dropless"  # a full run directory: analyse it like any checkpoint
    analyze_checkpoint(run, cache_dir=data.cache_dir.parent,
                       config=AnalysisConfig(tokens_per_domain=256, seq_len=32, sample_tokens=30))
    out = build_report([lab_dir.parent, run], tmp_path / "report.html", title="test report")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]  # nothing beside it
    doc = out.read_text(encoding="utf-8")
    for section in SECTIONS:
        assert f'<section id="{section}">' in doc
    # No external references: every src/href is a data URI or an in-page anchor.
    refs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', doc)
    assert refs and all(r.startswith(("data:", "#")) for r in refs), [r[:40] for r in refs if not r.startswith(("data:", "#"))]
    assert not re.search(r"<(script|link|iframe)\b", doc)
    assert "url(" not in doc and "@import" not in doc
    assert doc.count("data:image/png;base64,") >= 4  # curves, load, lab plots, heatmaps
    assert 'class="coloured-text"' in doc
    # The inputs fix the verdict: at capacity factor 0.5 about half the assignments cannot
    # fit, dropless drops none, so the capacity effect is shown, and the report must say so.
    assert load_experiment(lab_dir)["passed"] is True
    assert "effect shown as claimed" in doc and "NOT shown" not in doc
    # Nothing is left empty when every kind of input was given.
    assert "No training runs" not in doc and "No lab experiments" not in doc and "No specialisation" not in doc


@pytest.mark.parametrize("passed", [True, False])
def test_report_shows_the_verdict_that_experiment_json_holds(lab_dir, tmp_path, passed: bool) -> None:
    exp = tmp_path / "capacity"
    exp.mkdir()
    d = load_experiment(lab_dir) | {"passed": passed}
    (exp / "experiment.json").write_text(json.dumps(d), encoding="utf-8")
    doc = build_report([exp], tmp_path / "r.html").read_text(encoding="utf-8")
    shown, not_shown = "effect shown as claimed", "effect NOT shown at this scale"
    assert (shown in doc, not_shown in doc) == (passed, not passed)
    assert ("<span class='ok'>shown</span>" in doc) == passed  # the summary's mark
    assert ("<span class='bad'>not shown</span>" in doc) == (not passed)


def test_report_shows_a_comparison_as_its_tradeoff_table(tmp_path) -> None:
    """A `moelab compare` folder (comparison.json, runs below it) gives the summary its
    trade-off table: quality per FLOP beside quality per byte, as comparison.json holds them."""
    def model(role, val, ratio, q_flop, q_mib):
        return {"role": role, "total_params": 5_000_000, "active_params": 3_000_000, "train_flops_per_token": 1.26e7,
                "val_loss": val, "steps_to_dense_loss_ratio": ratio, "quality_per_tflop": q_flop,
                "quality_per_mib": q_mib}

    cmp = {"roles": {"moe": "fg", "dense": "d", "moe_coarse": "top2"},
           "models": {"fg": model("moe", 3.5, 0.78, 0.7213, 0.5121), "d": model("dense", 3.55, None, 0.7151, 0.9012),
                      "top2": model("moe_coarse", 3.6, None, 0.7088, 0.4987)}}
    (tmp_path / "cmp").mkdir()
    (tmp_path / "cmp" / "comparison.json").write_text(json.dumps(cmp))
    doc = build_report([tmp_path / "cmp"], tmp_path / "r.html").read_text(encoding="utf-8")
    for cell in ("<th>nats/TFLOP</th>", "<th>nats/MiB</th>", "<th>steps to dense loss</th>", "<td>0.78x</td>",
                 "<td>never</td>", "<td>0.7213</td>", "<td>0.9012</td>", "<td>top2</td>"):
        assert cell in doc, cell


def test_report_refuses_a_folder_with_nothing_to_report(tmp_path) -> None:
    with pytest.raises(DataError, match="nothing to report"):
        build_report([tmp_path], tmp_path / "r.html")


def test_cli_report_and_analyze_json(data, lab_dir, tmp_path, capsys) -> None:
    run = lab_dir / "broken-cf-0.5"
    assert main(["analyze", str(run / "model.safetensors"), "--cache-dir", str(data.cache_dir.parent),
                 "--tokens", "256", "--json", "--out", str(tmp_path / "an")]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["num_experts"] == 8 and set(d["domains"]) == set(data.domains)
    for layer in d["layers"].values():
        for row in layer["domain_expert_share"].values():
            assert sum(row) == pytest.approx(1.0)
    assert main(["report", str(lab_dir), "--out", str(tmp_path / "r.html")]) == 0
    assert Path(capsys.readouterr().out.strip()) == tmp_path / "r.html"


def test_cli_lab_json_schema(data, tmp_path, capsys) -> None:
    rc = main(["lab", "capacity", "--scale", "test", "--steps", "3", "--cache-dir", str(data.cache_dir.parent),
               "--no-progress", "--json", "--out", str(tmp_path / "cap")])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    assert d["experiment"] == "capacity"
    assert any(name.startswith("broken") for name in d["runs"])
    for r in d["runs"].values():
        for key in ("busiest_expert_share", "load_cv", "dead_experts", "dropped_fraction", "max_router_logit",
                    "nan_steps", "val_loss"):
            assert key in r


def test_cli_errors_are_one_line(tmp_path, capsys) -> None:
    assert main(["analyze", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moelab analyze: error:") and err.count("\n") == 1
