"""Failure-mode experiments at a tiny scale: each effect shows in the claimed direction."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moelab.errors import ConfigError
from moelab.lab.failures import (
    LabConfig,
    RunSpec,
    bf16_routing_flips,
    count_spikes,
    experiment_runs,
    run_experiment,
    skew_router,
    summarize_run,
    train_run,
)
from moelab.lab.metrics import RunMetrics
from moelab.model import Transformer


def test_count_spikes() -> None:
    loss = np.array([5.0] * 30 + [9.0] + [5.0] * 5 + [float("nan")])
    assert count_spikes(loss, 1.5) == 2
    assert count_spikes(np.linspace(6, 3, 50), 1.5) == 0


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match="LabConfig.steps"):
        LabConfig(steps=0)
    with pytest.raises(ConfigError, match="capacity_factors"):
        LabConfig(capacity_factors=(0.0,))
    with pytest.raises(ConfigError, match="LabConfig.aux_loss_coef must be > 0 for the collapse"):
        experiment_runs("collapse", LabConfig(aux_loss_coef=0.0), 512)
    with pytest.raises(ConfigError, match="LabConfig.ep_sizes"):
        LabConfig(ep_sizes=(3,))
    with pytest.raises(ConfigError, match="LabConfig.cost_capacity_factor"):
        LabConfig(cost_capacity_factor=0.0)
    with pytest.raises(ConfigError, match="unknown lab experiment"):
        experiment_runs("melt", LabConfig(), 512)


def test_skew_router_makes_the_favoured_experts_take_every_token(data, lab_cfg) -> None:
    torch.manual_seed(0)
    model = Transformer(lab_cfg.model_config(data.vocab_size, aux_loss_coef=0.0))
    x = torch.from_numpy(np.asarray(data.val["prose"][:256], dtype=np.int64)).view(4, 64)[:, : lab_cfg.seq_len]
    before = model(x).layer_stats
    skew_router(model, strength=lab_cfg.skew_strength)
    after = model(x).layer_stats
    for layer, s in after.items():
        assert float(s.busiest_expert_share) > float(before[layer].busiest_expert_share)
        assert float(s.busiest_expert_share) > 0.4  # top-2: 0.5 is the most one expert can get


@pytest.fixture(scope="module")
def collapse(data, lab_cfg, tmp_path_factory):
    return run_experiment("collapse", data, tmp_path_factory.mktemp("collapse"), config=lab_cfg, progress=False,
                          only=["broken-no-aux", "aux-loss", "dense-active"])


def test_collapse_raises_busiest_share_and_aux_loss_lowers_it(collapse, lab_cfg) -> None:
    broken, cured = collapse.runs["broken-no-aux"], collapse.runs["aux-loss"]
    uniform = 1 / lab_cfg.num_experts
    assert broken.busiest_expert_share > 2.5 * uniform
    assert cured.busiest_expert_share < broken.busiest_expert_share
    assert cured.load_cv < broken.load_cv
    assert broken.dead_experts >= cured.dead_experts
    assert broken.val_loss is not None and np.isfinite(broken.val_loss)


def test_collapse_measures_what_the_imbalance_costs(collapse, lab_cfg) -> None:
    broken, cured, dense = (collapse.runs[n] for n in ("broken-no-aux", "aux-loss", "dense-active"))
    for r in (broken, cured):
        assert r.drop_capacity_factor == lab_cfg.cost_capacity_factor
        assert 0.0 <= r.dropped_at_capacity <= 1.0
        assert set(r.ep_step_factor) == {str(ep) for ep in lab_cfg.ep_sizes}
        assert all(1.0 <= f <= int(ep) for ep, f in r.ep_step_factor.items())
        assert 1.0 <= r.effective_experts <= lab_cfg.num_experts
    # An expert with share s > cf/E of the assignments loses at least s - cf/E of them.
    assert broken.dropped_at_capacity > 0.1 and broken.dropped_at_capacity > cured.dropped_at_capacity
    assert broken.ep_step_factor["8"] > cured.ep_step_factor["8"]
    assert broken.effective_experts < cured.effective_experts
    # The dense twin trains on the same batches; it has no router to measure.
    assert dense.val_loss is not None and dense.dropped_at_capacity is None and dense.busiest_expert_share is None
    assert [s for s, _ in dense.val_curve] == [s for s, _ in broken.val_curve]
    # Without the sweep and the aux-free run the verdict says what it cannot judge.
    assert not collapse.passed and any("cannot compare the cures' costs" in v for v in collapse.verdicts)


def test_experiment_json_and_plots_are_on_disk(collapse) -> None:
    out = collapse.out_dir
    d = json.loads((__import__("pathlib").Path(out) / "experiment.json").read_text())
    assert d["experiment"] == "collapse"
    assert set(d["runs"]) == {"broken-no-aux", "aux-loss", "dense-active"}
    for path in d["plots"].values():
        assert __import__("pathlib").Path(path).is_file()
    # Each run keeps its metrics: the summary can be recomputed from disk.
    for name, r in d["runs"].items():
        again = summarize_run(name, RunMetrics.from_run(r["run_dir"]), run_dir=r["run_dir"])
        assert again.busiest_expert_share == pytest.approx(r["busiest_expert_share"])
    summary = collapse.json_summary()
    for r in summary["runs"].values():
        for key in ("busiest_expert_share", "load_cv", "dead_experts", "dropped_fraction", "max_router_logit",
                    "nan_steps", "val_loss", "dropped_at_capacity", "drop_capacity_factor", "ep_step_factor",
                    "effective_experts"):
            assert key in r


def test_capacity_below_one_drops_tokens(data, lab_cfg, tmp_path) -> None:
    cfg = lab_cfg.with_(steps=8, capacity_factors=(0.5, None))
    res = run_experiment("capacity", data, tmp_path, config=cfg, progress=False)
    assert set(res.runs) == {"broken-cf-0.5", "dropless"}
    assert res.runs["broken-cf-0.5"].dropped_fraction > 0.2  # at 0.5 at least half the capacity is missing
    assert res.runs["dropless"].dropped_fraction == 0.0
    for layer in res.runs["broken-cf-0.5"].per_layer.values():
        assert layer["dropped_fraction"] > 0


def test_a_diverging_run_is_stopped_and_reported_not_raised(data, lab_cfg, tmp_path) -> None:
    def poison(model: Transformer) -> None:
        with torch.no_grad():
            model.moe_layers[0].router.weight.fill_(float("inf"))

    cfg = lab_cfg.with_(steps=5)
    spec = RunSpec("broken-nan", "router weights set to inf", cfg.model_config(data.vocab_size), cfg.lr, poison)
    res = train_run(spec, cfg, data, tmp_path / "run", progress=False)
    assert res.nan_steps >= 1 and res.stopped_reason
    summary = summarize_run("broken-nan", RunMetrics.from_run(tmp_path / "run"), run_dir=tmp_path / "run",
                            nan_steps=res.nan_steps, stopped_reason=res.stopped_reason, steps_done=res.steps_done)
    assert summary.nan_steps >= 1 and summary.steps_done == 0


@pytest.mark.slow
def test_instability_z_loss_keeps_router_logits_smaller(data, lab_cfg, tmp_path) -> None:
    res = run_experiment("instability", data, tmp_path, config=lab_cfg.with_(steps=30), progress=False)
    broken, cured = res.runs["broken-no-zloss"], res.runs["z-loss"]
    assert broken.max_router_logit > cured.max_router_logit
    assert set(res.runs) == {"broken-no-zloss", "broken-bf16-router", "probe-big-init", "z-loss"}
    assert res.runs["broken-bf16-router"].settings["router_dtype"] == "bfloat16"
    for r in res.runs.values():  # measured on every run, a share
        assert 0.0 <= r.bf16_routing_flips <= 1.0
    assert "bf16_routing_flips" in res.json_summary()["runs"]["z-loss"]


def test_bf16_routing_flips_counts_top_k_changes(lab_cfg) -> None:
    torch.manual_seed(0)
    cfg = lab_cfg.model_config(512, top_k=1)
    model = Transformer(cfg).eval()
    ids = [torch.randint(0, 512, (2, 16)) for _ in range(2)]
    with torch.no_grad():
        for moe in model.moe_layers:
            w = moe.router.weight
            w.normal_(0, 1.0)  # clear margins between experts
    clear = bf16_routing_flips(model, ids)
    assert clear is not None and clear < 0.1
    with torch.no_grad():
        for moe in model.moe_layers:
            w = moe.router.weight
            w[2:] = 0.0  # logit 0: they win (in both precisions alike) where x.w0 < 0
            # Expert 1 a hair from expert 0 in a random direction u: fp32 orders the two by the
            # sign of x.u (half the tokens each way), bf16 rounds both rows to the same values,
            # so it ties and keeps one index for every token, whichever topk keeps.
            w[1] = w[0] + 1e-4 * torch.randn_like(w[0])
    near_ties = bf16_routing_flips(model, ids)
    assert near_ties > 0.1  # ~1/4: tokens with x.w0 > 0, and of those the half that bf16 flips
    dense = Transformer(cfg.with_(moe=None))
    assert bf16_routing_flips(dense, ids) is None


def test_an_interrupted_experiment_resumes_keeping_finished_runs(data, lab_cfg, tmp_path, monkeypatch) -> None:
    """`lab --resume`: the finished run is read back (weights too: its measurements are the
    same), the one that was cut short runs again, and the summary equals the uninterrupted one."""
    import moelab.lab.failures as failures
    from moelab.io import sha256_file

    cfg = lab_cfg.with_(steps=6, capacity_factors=(0.5, None))
    full = run_experiment("capacity", data, tmp_path / "full", config=cfg, progress=False)
    real = failures.train_run

    def dies_on_the_second(spec, *args, **kwargs):
        if spec.name == "dropless":
            raise KeyboardInterrupt
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(failures, "train_run", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        run_experiment("capacity", data, tmp_path / "cut", config=cfg, progress=False)
    kept = sha256_file(tmp_path / "cut" / "broken-cf-0.5" / "metrics.jsonl")
    monkeypatch.setattr(failures, "train_run", real)
    res = run_experiment("capacity", data, tmp_path / "cut", config=cfg, progress=False, resume=True)
    assert sha256_file(tmp_path / "cut" / "broken-cf-0.5" / "metrics.jsonl") == kept  # not retrained
    for name in ("broken-cf-0.5", "dropless"):
        assert res.runs[name].dropped_fraction == full.runs[name].dropped_fraction
        assert res.runs[name].val_loss == full.runs[name].val_loss
    assert res.passed == full.passed
