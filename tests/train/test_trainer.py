"""The training loop: learning, schedule, MoE balancing, validation, non-finite stops."""

from __future__ import annotations

import math

import pytest
import torch

from moelab.data import val_batches
from moelab.errors import ConfigError
from moelab.model import Transformer
from moelab.train import TrainConfig, lr_at, read_metrics, train
from moelab.train.trainer import build_optimizer, evaluate

from .conftest import tiny_dense, tiny_moe, tiny_train


def test_loss_decreases(data, run_dir):
    result = train(tiny_moe(), tiny_train(steps=40, eval_interval=20), data, run_dir, progress=False,
                   tensorboard=False)
    assert result.stopped_reason is None and result.steps_done == 40
    first, last = result.history[0]["val_loss"], result.history[-1]["val_loss"]
    assert first == pytest.approx(math.log(512), abs=0.2)  # near-uniform predictions at init
    assert last < first - 0.7
    rows = read_metrics(run_dir, kind="train")
    early = sum(r["lm_loss"] for r in rows[:5]) / 5
    late = sum(r["lm_loss"] for r in rows[-5:]) / 5
    assert late < early - 0.7


def test_metrics_schema_and_tensorboard(data, run_dir):
    train(tiny_moe(), tiny_train(steps=4, eval_interval=2), data, run_dir, progress=True)
    rows = read_metrics(run_dir)
    train_rows = [r for r in rows if r["kind"] == "train"]
    eval_rows = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert [r["step"] for r in eval_rows] == [0, 2, 4]
    for r in train_rows:
        for key in ("loss", "lm_loss", "aux_loss", "z_loss", "lr", "grad_norm", "tokens_per_s"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), key
        assert set(r["layers"]) == {"0", "1"}
        assert sum(r["layers"]["0"]["tokens_per_expert"]) == 4 * 32 * 2  # B * T * top_k, dropless
    assert any(p.name.startswith("events.out.tfevents") for p in (run_dir / "tb").iterdir())
    assert (run_dir / "tokenizer.json").is_file()


def test_dense_model_trains_without_routing_rows(data, run_dir):
    result = train(tiny_dense(), tiny_train(steps=3), data, run_dir, progress=False, tensorboard=False)
    assert result.stopped_reason is None
    assert all(r["layers"] == {} and r["aux_loss"] == 0.0 for r in read_metrics(run_dir, kind="train"))


def test_validation_covers_every_domain_token_weighted(data, run_dir):
    cfg = tiny_moe()
    result = train(cfg, tiny_train(steps=2), data, run_dir, progress=False, tensorboard=False)
    assert set(result.val_loss_by_domain) == set(data.domains) == {"code", "prose", "math", "data"}
    # Overall = mean over all validation tokens: recompute from per-domain token counts.
    batches = val_batches(data.val, 4, 32, max_batches_per_domain=1)
    tokens = {d: sum(y.numel() for _, y in bs) for d, bs in batches.items()}
    expected = sum(result.val_loss_by_domain[d] * n for d, n in tokens.items()) / sum(tokens.values())
    assert result.val_loss == pytest.approx(expected, rel=1e-9)


def test_evaluate_matches_direct_cross_entropy(data):
    torch.manual_seed(0)
    model = Transformer(tiny_moe())
    batches = val_batches(data.val, 4, 32, max_batches_per_domain=1)
    overall, by_domain = evaluate(model, batches, torch.device("cpu"), lambda: torch.autocast("cpu", enabled=False))
    x, y = batches["math"][0]
    with torch.no_grad():
        logits = model(x).logits
    direct = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), y.reshape(-1))
    assert by_domain["math"] == pytest.approx(float(direct), rel=1e-5)
    assert model.training  # evaluate restores the mode


def test_deterministic_under_seed(data, tmp_path):
    a = train(tiny_moe(), tiny_train(steps=5), data, tmp_path / "a", progress=False, tensorboard=False)
    b = train(tiny_moe(), tiny_train(steps=5), data, tmp_path / "b", progress=False, tensorboard=False)
    c = train(tiny_moe(), tiny_train(steps=5, seed=1), data, tmp_path / "c", progress=False, tensorboard=False)
    assert a.val_loss == b.val_loss
    assert a.val_loss != c.val_loss


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(b > a for a, b in zip(lrs[:10], lrs[1:10], strict=False))
    assert all(b <= a for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lr_at(100, cfg) == pytest.approx(0.1)
    assert lrs[55] == pytest.approx(0.55, abs=0.01)  # cosine midpoint: halfway between 1 and 0.1


def test_weight_decay_skips_vectors():
    model = Transformer(tiny_moe(router="sigmoid", bias_update_rate=0.01))
    opt = build_optimizer(model, tiny_train())
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] > 0 and no_decay["weight_decay"] == 0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    # The aux-loss-free bias is a buffer: never touched by the optimizer.
    opt_ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(b) not in opt_ids for b in model.buffers())


@pytest.mark.parametrize("rate", [0.0, 0.05])
def test_aux_loss_free_bias_updates(data, run_dir, rate):
    cfg = tiny_moe(router="sigmoid", bias_update_rate=rate, aux_loss_coef=0.0)
    model = Transformer(cfg)
    train(cfg, tiny_train(steps=3), data, run_dir, progress=False, tensorboard=False, model=model)
    bias = model.moe_layers[0].router.expert_bias
    assert bool((bias != 0).any()) == (rate > 0)


def test_loss_coefficients_enter_the_objective(data, tmp_path):
    for name, coef in (("off", 0.0), ("on", 1.0)):
        train(tiny_moe(aux_loss_coef=coef, z_loss_coef=0.0), tiny_train(steps=1), data, tmp_path / name,
              progress=False, tensorboard=False)
    off, on = (read_metrics(tmp_path / n, kind="train")[0] for n in ("off", "on"))
    assert off["loss"] == pytest.approx(off["lm_loss"])
    assert on["loss"] == pytest.approx(on["lm_loss"] + on["aux_loss"], rel=1e-5)


def test_nan_stops_cleanly_and_keeps_last_checkpoint(data, run_dir):
    cfg = tiny_moe()
    model = Transformer(cfg)

    def poison(step: int, row: dict) -> None:
        if step == 4:  # after the step-3 checkpoint... wait for it to be written first
            with torch.no_grad():
                model.embed_tokens.weight.fill_(float("nan"))

    result = train(cfg, tiny_train(steps=10, checkpoint_interval=3), data, run_dir, progress=False,
                   tensorboard=False, model=model, on_step=poison)
    assert result.steps_done == 4 and result.nan_steps == 1
    assert result.stopped_reason is not None and "step 5" in result.stopped_reason
    rows = read_metrics(run_dir)
    assert rows[-1]["kind"] == "stop" and rows[-1]["reason"] == result.stopped_reason
    from moelab.train.checkpoint import read_trainer_state

    assert read_trainer_state(run_dir)["step"] == 3
    fresh = Transformer(cfg)
    from moelab.train.checkpoint import load_checkpoint

    load_checkpoint(run_dir, model=fresh, optimizer=build_optimizer(fresh, tiny_train()))
    assert all(torch.isfinite(p).all() for p in fresh.parameters())


def test_nan_loss_without_router_check(data, run_dir):
    cfg = tiny_dense()
    model = Transformer(cfg)
    with torch.no_grad():
        model.lm_head.weight.fill_(float("inf"))
    result = train(cfg, tiny_train(steps=3), data, run_dir, progress=False, tensorboard=False, model=model)
    assert result.steps_done == 0 and "step 1" in result.stopped_reason


def test_config_validation_names_field():
    with pytest.raises(ConfigError, match="TrainConfig.lr"):
        TrainConfig(lr=-1.0)
    with pytest.raises(ConfigError, match="TrainConfig.steps"):
        TrainConfig(steps=0)
    with pytest.raises(ConfigError, match="device"):
        TrainConfig(device="tpu")
    with pytest.raises(ConfigError, match="TrainConfig.precision"):
        TrainConfig(precision="fp16")


@pytest.mark.parametrize("native_bf16", ["0", "1"])
def test_precision_bf16_autocasts_and_auto_follows_the_cpu(data, tmp_path, monkeypatch, native_bf16):
    # "auto" on CPU is plain fp32 (identical to "fp32") where the CPU has no native bf16,
    # bf16 autocast (identical to "bf16") where it has; "bf16" autocasts, so its losses
    # differ in the low bits but it still trains.
    monkeypatch.setenv("MOELAB_CPU_BF16", native_bf16)
    runs = {p: train(tiny_moe(), tiny_train(steps=6, precision=p), data, tmp_path / p, progress=False,
                     tensorboard=False)
            for p in ("auto", "fp32", "bf16")}
    loss = {p: [r["loss"] for r in read_metrics(tmp_path / p, kind="train")] for p in runs}
    assert loss["auto"] == loss["bf16" if native_bf16 == "1" else "fp32"]
    assert loss["bf16"] != loss["fp32"]
    assert max(abs(a - b) for a, b in zip(loss["bf16"], loss["fp32"], strict=True)) < 0.1
    assert runs["bf16"].stopped_reason is None


def test_resolve_precision_rule(monkeypatch):
    from moelab.train.trainer import resolve_precision

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for native, want in (("0", "fp32"), ("1", "bf16")):
        monkeypatch.setenv("MOELAB_CPU_BF16", native)
        assert resolve_precision("auto", cpu) == want
        assert resolve_precision("auto", cuda) == "bf16"
        assert resolve_precision("fp32", cuda) == "fp32" and resolve_precision("bf16", cpu) == "bf16"


def test_refuses_vocab_smaller_than_tokenizer(data, run_dir):
    with pytest.raises(ConfigError, match="vocab_size"):
        train(tiny_dense().with_(vocab_size=100), tiny_train(), data, run_dir, progress=False)


def test_refuses_to_overwrite_a_run(data, run_dir):
    train(tiny_dense(), tiny_train(steps=1), data, run_dir, progress=False, tensorboard=False)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(tiny_dense(), tiny_train(steps=1), data, run_dir, progress=False, tensorboard=False)
    r = train(tiny_dense(), tiny_train(steps=2), data, run_dir, progress=False, tensorboard=False, overwrite=True)
    assert [x["step"] for x in read_metrics(run_dir, kind="train")] == [1, 2] and r.steps_done == 2


def test_rows_and_result_say_the_threads_and_load(data, run_dir):
    r = train(tiny_moe(), tiny_train(steps=2), data, run_dir, progress=False, tensorboard=False)
    assert r.threads == torch.get_num_threads() >= 1
    rows = read_metrics(run_dir, kind="train")
    assert all(row["threads"] == r.threads and "load_avg_1m" in row for row in rows)
    assert r.load_avg is None or r.load_avg >= 0


def test_a_param_group_may_scale_the_schedule(data, run_dir, monkeypatch):
    """A group with "lr_scale" follows `lr_at` times its scale (benchmarks/sweep.py's
    per-expert learning rate); the other groups follow `lr_at` itself."""
    import moelab.train.trainer as trainer

    made = []

    def build(model, cfg, *, fused=False):
        opt = build_optimizer(model, cfg, fused=fused)
        experts = [p for n, p in model.named_parameters() if ".mlp.experts." in n]
        ids = {id(p) for p in experts}
        opt.param_groups[0]["params"] = [p for p in opt.param_groups[0]["params"] if id(p) not in ids]
        opt.add_param_group({"params": experts, "weight_decay": cfg.weight_decay, "lr_scale": 0.5})
        made.append(opt)
        return opt

    monkeypatch.setattr(trainer, "build_optimizer", build)
    tc = tiny_train(steps=5, checkpoint_interval=0)
    train(tiny_moe(), tc, data, run_dir, progress=False, tensorboard=False)
    (opt,) = made
    last = lr_at(tc.steps - 1, tc)
    assert opt.param_groups[0]["lr"] == pytest.approx(last)
    assert opt.param_groups[-1]["lr"] == pytest.approx(0.5 * last) and opt.param_groups[-1]["params"]
