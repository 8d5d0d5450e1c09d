"""MoE-vs-dense comparison, parameter accounting, and the train/compare CLIs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import moelab.train.compare as compare_mod
from moelab.accounting import count_params, spec_from_moelab_config
from moelab.cli.main import main
from moelab.errors import ConfigError
from moelab.model import PRESETS, Transformer
from moelab.train.compare import (
    COMPARISON_FILE,
    compare,
    compare_seeds,
    learned_nats,
    loss_at_step,
    quality_per_mib,
    quality_per_tflop,
    render_seeds,
    render_table,
    steps_to_reach,
)

from .conftest import tiny_dense, tiny_moe, tiny_train


def test_steps_to_reach_interpolates():
    hist = [{"step": 0, "val_loss": 6.0}, {"step": 10, "val_loss": 5.0}, {"step": 20, "val_loss": 4.0}]
    assert steps_to_reach(hist, 4.5) == pytest.approx(15.0)
    assert steps_to_reach(hist, 5.0) == pytest.approx(10.0)
    assert steps_to_reach(hist, 6.5) == 0.0
    assert steps_to_reach(hist, 3.9) is None
    # The first crossing counts, even if the curve goes back up later.
    bumpy = [*hist, {"step": 30, "val_loss": 4.6}]
    assert steps_to_reach(bumpy, 4.5) == pytest.approx(15.0)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_num_params_equals_accounting(name):
    cfg = PRESETS[name]
    with torch.device("meta"):
        model = Transformer(cfg)
    counts = count_params(spec_from_moelab_config(cfg))
    assert model.num_params() == counts.total
    if cfg.moe is not None:
        per_expert = sum(p.numel() for p in model.moe_layers[0].experts.parameters()) // cfg.moe.num_experts
        unused = len(cfg.moe_layers) * (cfg.moe.num_experts - cfg.moe.top_k) * per_expert
        assert counts.active == counts.total - unused


def test_tiny_presets_are_matched():
    moe, dense, total = PRESETS["tiny-moe"], PRESETS["tiny-dense"], PRESETS["tiny-dense-total"]
    assert dense.d_ff == moe.moe.top_k * moe.moe.d_expert
    assert total.d_ff == moe.moe.num_experts * moe.moe.d_expert
    assert dense.vocab_size == moe.vocab_size == total.vocab_size


def test_compare_trains_all_on_same_stream(data, tmp_path):
    models = {"moe": ("m", tiny_moe()), "dense": ("d", tiny_dense(64)), "dense_total": ("t", tiny_dense(128))}
    result = compare(models, tiny_train(steps=6, eval_interval=3), data, tmp_path, progress=False, tensorboard=False)
    d = result.to_dict()
    assert set(d["models"]) == {"m", "d", "t"} and d["roles"] == {"moe": "m", "dense": "d", "dense_total": "t"}
    for entry in d["models"].values():
        for key in ("total_params", "active_params", "val_loss", "val_loss_by_domain", "tokens_per_s"):
            assert key in entry
        assert set(entry["val_loss_by_domain"]) == set(data.domains)
    m, dn = d["models"]["m"], d["models"]["d"]
    assert m["active_params"] < m["total_params"] and dn["active_params"] == dn["total_params"]
    # Same active FFN width: the MoE adds only the router to the dense model's FLOPs.
    router_flops = 2 * 2 * 4 * 32 * 3  # 2 FLOPs * layers * E * D, x3 for training
    assert m["train_flops_per_token"] == pytest.approx(dn["train_flops_per_token"] + router_flops)
    assert d["moe_steps_to_dense_loss"] == steps_to_reach(result.models["moe"].history, dn["val_loss"])
    if d["moe_steps_to_dense_loss"] is not None:
        assert d["moe_steps_to_dense_loss_ratio"] == pytest.approx(d["moe_steps_to_dense_loss"] / 6)
    json.dumps(d)  # JSON-serialisable
    assert "m" in render_table(result)
    # Same token stream: identical training batches means identical step-1 token counts.
    from moelab.train import read_metrics

    assert [r["step"] for r in read_metrics(tmp_path / "m", kind="train")] == list(range(1, 7))


def test_quality_per_flop_and_per_byte_are_the_documented_ratios():
    q = math.log(8192) - 3.5
    assert learned_nats(3.5, 8192) == pytest.approx(q)
    # Per byte: the final quality over the MiB of weights.
    assert quality_per_mib(3.5, 8192, 6 * 2**20) == pytest.approx(q / 6)
    assert quality_per_mib(None, 8192, 6 * 2**20) is None
    hist = [{"step": 0, "val_loss": 9.0}, {"step": 10, "val_loss": 5.0}, {"step": 20, "val_loss": 3.0}]
    assert loss_at_step(hist, 15) == pytest.approx(4.0) and loss_at_step(hist, 20) == 3.0
    assert loss_at_step(hist, 25) is None
    # Per FLOP, at equal compute: 1 TFLOP a step, a budget of 15 TFLOP reads the curve at step 15.
    assert quality_per_tflop(hist, 8192, 1e12, 15e12) == pytest.approx((math.log(8192) - 4.0) / 15)
    # A model 1.5x as costly per step meets that budget at step 10.
    assert quality_per_tflop(hist, 8192, 1.5e12, 15e12) == pytest.approx((math.log(8192) - 5.0) / 15)
    # A run that stopped short of the budget counts what it spent.
    assert quality_per_tflop(hist, 8192, 0.5e12, 15e12) == pytest.approx((math.log(8192) - 3.0) / 10)
    assert quality_per_tflop([], 8192, 1e12, 15e12) is None


def test_every_model_gets_its_steps_to_dense_loss_and_the_tradeoff_columns(data, tmp_path):
    models = {"moe": ("m", tiny_moe()), "dense": ("d", tiny_dense(64)), "moe_coarse": ("c", tiny_moe(top_k=1))}
    tc = tiny_train(steps=6, eval_interval=2)
    result = compare(models, tc, data, tmp_path, progress=False, tensorboard=False)
    dense = result.models["dense"]
    assert dense.steps_to_dense_loss is None and dense.steps_to_dense_loss_ratio is None
    for role in ("moe", "moe_coarse"):
        m = result.models[role]
        assert m.steps_to_dense_loss == steps_to_reach(m.history, dense.val_loss)
        assert m.steps_to_dense_loss_ratio == (None if m.steps_to_dense_loss is None
                                               else pytest.approx(m.steps_to_dense_loss / 6))
    for m in result.models.values():
        assert m.tokens_trained == 6 * tc.batch_size * tc.seq_len
        assert m.train_flops == pytest.approx(m.train_flops_per_token * m.tokens_trained)
        assert m.weight_bytes == 2 * m.total_params  # bf16, every expert resident
        assert m.quality_per_mib == pytest.approx(quality_per_mib(m.val_loss, m.vocab_size, m.weight_bytes))
        assert m.quality_per_tflop == pytest.approx(quality_per_tflop(
            m.history, m.vocab_size, m.train_flops_per_token * tc.batch_size * tc.seq_len, dense.train_flops))
    # At its own budget the dense model's figure is its final quality over its FLOPs.
    assert dense.quality_per_tflop == pytest.approx(learned_nats(dense.val_loss, dense.vocab_size)
                                                    / (dense.train_flops / 1e12))
    # Same active FLOPs, more weights: per byte the MoE pays for every expert it holds.
    moe = result.models["moe"]
    assert moe.weight_bytes > dense.weight_bytes
    table = render_table(result)
    header = table.splitlines()[0].split("  ")
    for col in ("steps to dense loss", "nats/TFLOP", "nats/MiB"):
        assert col in [h.strip() for h in header]
    assert f"{moe.quality_per_mib:.4f}" in table and f"{dense.quality_per_tflop:.4f}" in table
    # The comparison is written beside the runs (the HTML report reads it).
    saved = json.loads((tmp_path / COMPARISON_FILE).read_text())
    assert saved["roles"] == {"moe": "m", "dense": "d", "moe_coarse": "c"}
    assert saved["models"]["m"]["quality_per_mib"] == pytest.approx(moe.quality_per_mib)


def test_compare_over_seeds_aggregates_the_per_seed_runs(data, tmp_path):
    models = {"moe": ("m", tiny_moe()), "dense": ("d", tiny_dense(64))}
    res = compare_seeds(models, tiny_train(steps=4, eval_interval=2), data, tmp_path, [0, 3], progress=False,
                        tensorboard=False)
    assert [r.train_config["seed"] for r in res.results] == [0, 3]
    assert (tmp_path / "seed-0" / "m" / "metrics.jsonl").is_file() and (tmp_path / "seed-3" / "d").is_dir()
    m0, m3 = (r.models["moe"].val_loss for r in res.results)
    assert m0 != m3  # another seed: another init and batch order
    stats = res.val_loss_stats()
    assert stats["moe"]["mean"] == pytest.approx((m0 + m3) / 2)
    assert stats["moe"]["std"] == pytest.approx(abs(m0 - m3) / 2)
    # The ratio on the seed-mean curves is the first crossing of the mean MoE curve.
    mean_curve = [{"step": a["step"], "val_loss": (a["val_loss"] + b["val_loss"]) / 2}
                  for a, b in zip(res.results[0].models["moe"].history, res.results[1].models["moe"].history,
                                  strict=True)]
    expect = steps_to_reach(mean_curve, stats["dense"]["mean"])
    assert res.mean_curve_ratio() == (None if expect is None else pytest.approx(expect / 4))
    d = res.to_dict()
    json.dumps(d)
    assert set(d["val_loss"]) == {"m", "d"} and len(d["per_seed"]) == 2
    assert "over seeds [0, 3]" in render_seeds(res)
    # The seeds' trade-off table: per role the seed means of quality per FLOP and per byte.
    trade = d["tradeoff"]
    assert trade["dense"]["steps_to_dense_loss_ratio_per_seed"] is None
    assert trade["moe"]["steps_to_dense_loss_ratio_per_seed"] == [r.models["moe"].steps_to_dense_loss_ratio
                                                                    for r in res.results]
    assert trade["moe"]["quality_per_mib_mean"] == pytest.approx(
        sum(r.models["moe"].quality_per_mib for r in res.results) / 2)
    assert "nats/TFLOP" in render_seeds(res) and "nats/MiB" in render_seeds(res)
    with pytest.raises(ConfigError, match="seeds must be distinct"):
        compare_seeds(models, tiny_train(), data, tmp_path / "x", [1, 1])


def _write_cfg(path, cfg):
    path.write_text(json.dumps(cfg.to_dict()))
    return str(path)


def _jsonl(data, tmp_path):
    docs = [{"text": data.tokenizer.decode(data.val[d][i : i + 300].tolist()), "domain": d}
            for d in data.domains for i in range(0, min(6000, len(data.val[d]) - 300), 300)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in docs))
    return str(path)


def test_cli_compare_json(data, tmp_path, capsys):
    argv = ["compare", "--moe", _write_cfg(tmp_path / "m.json", tiny_moe()), "--dense",
            _write_cfg(tmp_path / "d.json", tiny_dense()), "--data", _jsonl(data, tmp_path), "--steps", "4",
            "--batch-size", "2", "--seq-len", "16", "--eval-interval", "2", "--eval-batches", "1",
            "--out", str(tmp_path / "cmp"), "--cache-dir", str(tmp_path / "cache"), "--json", "--no-progress",
            "--no-tensorboard", "--aux-loss-coef", "0.02"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["models"]) == {"m", "d"} and "moe_steps_to_dense_loss_ratio" in out
    saved = json.loads((tmp_path / "cmp" / "m" / "config.json").read_text())
    assert saved["model"]["moe"]["aux_loss_coef"] == 0.02
    # --seeds 2: one comparison per seed under OUT/seed-<s>, aggregated.
    argv[argv.index("--out") + 1] = str(tmp_path / "cmp2")
    assert main([*argv, "--seeds", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["seeds"] == [0, 1] and set(out["val_loss"]) == {"m", "d"}
    assert (tmp_path / "cmp2" / "seed-1" / "d" / "config.json").is_file()
    assert main([*argv, "--seeds", "0"]) == 2
    assert "--seeds must be >= 1" in capsys.readouterr().err


def test_cli_train_and_resume(data, tmp_path, capsys):
    common = ["--model", _write_cfg(tmp_path / "m.json", tiny_moe()), "--data", _jsonl(data, tmp_path),
              "--batch-size", "2", "--seq-len", "16", "--cache-dir", str(tmp_path / "cache"), "--no-progress",
              "--no-tensorboard", "--out", str(tmp_path / "run")]
    assert main(["train", *common, "--steps", "3", "--lr", "0.005"]) == 0
    assert "val loss" in capsys.readouterr().out
    # Resume reads the saved settings (lr=0.005); only --steps changes.
    assert main(["train", "--resume", "--out", str(tmp_path / "run"), "--steps", "5", "--no-progress",
                 "--cache-dir", str(tmp_path / "cache"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["steps_done"] == 5


def test_cli_corrupt_checkpoint_is_one_line(data, tmp_path, capsys):
    run = tmp_path / "run"
    common = ["--no-progress", "--no-tensorboard", "--cache-dir", str(tmp_path / "cache"), "--out", str(run)]
    assert main(["train", "--model", _write_cfg(tmp_path / "m.json", tiny_moe()), "--data", _jsonl(data, tmp_path),
                 "--steps", "2", "--batch-size", "2", "--seq-len", "16", *common]) == 0
    (run / "model.safetensors").write_bytes(b"\x00" * 64)
    capsys.readouterr()
    assert main(["train", "--resume", "--steps", "3", *common]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "Traceback" not in err


def test_an_interrupted_comparison_resumes(data, tmp_path, monkeypatch):
    """--resume keeps the finished run (not retrained), resumes the interrupted one from its
    checkpoint, and the comparison equals the uninterrupted one."""
    from moelab.io import sha256_file
    from moelab.train import read_metrics

    class Killed(Exception):
        pass

    models = {"moe": ("m", tiny_moe()), "dense": ("d", tiny_dense(64))}
    tc = tiny_train(steps=6, eval_interval=3, checkpoint_interval=3)
    full = compare(models, tc, data, tmp_path / "full", progress=False, tensorboard=False)

    calls = []
    real_train = compare_mod.train

    def dies_in_dense(*args, **kwargs):  # the moe run finishes; the dense one is killed at step 4
        if Path(args[3]).name == "d" and not kwargs.get("resume"):
            def on_step(step, row):
                if step == 4:
                    raise Killed
            kwargs["on_step"] = on_step
        calls.append((Path(args[3]).name, kwargs.get("resume", False)))
        return real_train(*args, **kwargs)

    monkeypatch.setattr(compare_mod, "train", dies_in_dense)
    with pytest.raises(Killed):
        compare(models, tc, data, tmp_path / "cut", progress=False, tensorboard=False)
    finished = sha256_file(tmp_path / "cut" / "m" / "metrics.jsonl")
    result = compare(models, tc, data, tmp_path / "cut", progress=False, tensorboard=False, resume=True)
    assert calls == [("m", False), ("d", False), ("m", True), ("d", True)]
    assert sha256_file(tmp_path / "cut" / "m" / "metrics.jsonl") == finished  # kept, not retrained
    assert result.models["moe"].history == full.models["moe"].history
    assert result.models["dense"].history == full.models["dense"].history
    assert result.moe_steps_to_dense_loss == full.moe_steps_to_dense_loss
    assert [r["step"] for r in read_metrics(tmp_path / "cut" / "d", kind="train")] == list(range(1, 7))
