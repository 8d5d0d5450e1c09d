"""``instability``: router logits that grow until the loss spikes or turns NaN, and the cure.

The broken recipe: a large router init, a high learning rate, un-normalised top-k
weights (a sharper router gets a larger weight, so the gradient keeps pushing logits up)
and no z-loss. Cure: the router z-loss (ST-MoE, Zoph et al. 2022, eq. 5). The other
ST-MoE cure is a float32 router: a third run computes the router in bf16
(``MoEConfig.router_dtype``), and every run reports how often a bf16 router would pick a
different top-k set than the float32 one on the same weights and inputs
(`bf16_routing_flips`): the precision loss that ST-MoE's "selective precision" avoids,
which grows with the logits. A probe run (``probe-big-init``) tries the one knob tied to
spikes that the earlier 100+ settings had not: Switch's init scale (Fedus et al. 2021,
§2.4: every weight initialised with 10x the variance); the verdict says whether it spiked.

Legend: T tokens, D model dim, E experts, K experts per token.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from moelab.data import val_batches
from moelab.lab.config import LabConfig
from moelab.lab.experiments.base import Experiment, MetricPlot, RunSpec, Verdict
from moelab.lab.imbalance import moe_inputs
from moelab.lab.run_summary import RunSummary
from moelab.model import Transformer


@torch.no_grad()
def scale_router_init(model: Transformer, std: float, *, seed: int = 0) -> None:
    """Re-initialise every router with N(0, std): large std = large initial logits."""
    g = torch.Generator().manual_seed(seed + 104729)
    for moe in model.moe_layers:
        moe.router.weight.copy_(torch.randn(moe.router.weight.shape, generator=g) * std)


@torch.no_grad()
def bf16_routing_flips(model: Transformer, batches: Sequence[torch.Tensor]) -> float | None:
    """Share of (token, MoE layer) pairs whose top-k expert set changes when the router
    logits come from a bf16 product instead of a float32 one (same weights, same inputs).

    Each MoE layer's input is captured on a normal forward of `batches` (token ids
    ``[B, T]``); logits and selection are the layer's own (`Router.logits`,
    `Router.select`: bias and expert groups included). ``None`` when the model has no token-choice MoE layer.
    """
    layers = [m for m in model.moe_layers if m.cfg.router != "expert_choice"]
    if not layers:
        return None
    flips = total = 0
    for moe, xs in zip(layers, moe_inputs(model, batches, layers), strict=True):  # eval mode: no router noise,
        for x in xs:  # so the flips measure the rounding alone
            x_TD = x.reshape(-1, x.shape[-1]).float()
            sets = [moe.router.select(moe.router.logits(x_TD, router_dtype=rd)).expert_idx_TK.sort(dim=-1).values
                    for rd in ("float32", "bfloat16")]
            flips += int((sets[0] != sets[1]).any(dim=-1).sum())
            total += x_TD.shape[0]
    return flips / total if total else None


# Switch's init scale (`runs`): a probe for a loss spike, outside the (broken, cured) pairs.
PROBE_RUN = "probe-big-init"


def runs(cfg: LabConfig, vocab_size: int) -> list[RunSpec]:
    """The unstable recipe without z-loss (float32 and bf16 router, and a probe with a
    larger init of every weight), then with it."""
    big = lambda m: scale_router_init(m, cfg.unstable_router_std, seed=cfg.seed)  # noqa: E731
    common = {"norm_topk_prob": False}
    big_std = cfg.model_config(vocab_size).init_std * math.sqrt(cfg.unstable_init_scale)
    return [
        RunSpec("broken-no-zloss",
                f"router init std {cfg.unstable_router_std:g}, lr {cfg.unstable_lr:g}, no z-loss",
                cfg.model_config(vocab_size, z_loss_coef=0.0, **common), cfg.unstable_lr, big,
                {"z_loss_coef": 0.0, "lr": cfg.unstable_lr, "router_std": cfg.unstable_router_std}),
        RunSpec("broken-bf16-router", "same as broken-no-zloss, router logits from a bf16 product",
                cfg.model_config(vocab_size, z_loss_coef=0.0, router_dtype="bfloat16", **common),
                cfg.unstable_lr, big,
                {"z_loss_coef": 0.0, "lr": cfg.unstable_lr, "router_std": cfg.unstable_router_std,
                 "router_dtype": "bfloat16"}),
        # Switch Transformer §2.4 (Fedus et al. 2021) ties instability to the init scale of
        # *all* weights (scale 1.0 instead of 0.1: std x sqrt(10)), not only the router's;
        # the sessions' 100+ settings only scaled the router.
        # A probe, not a pair: it asks whether this knob spikes; the verdict reports it and
        # does not ask it for logit growth.
        RunSpec(PROBE_RUN,
                f"same as broken-no-zloss, every weight's init std x sqrt({cfg.unstable_init_scale:g})",
                cfg.model_config(vocab_size, z_loss_coef=0.0, **common).with_(init_std=big_std),
                cfg.unstable_lr, big,
                {"z_loss_coef": 0.0, "lr": cfg.unstable_lr, "router_std": cfg.unstable_router_std,
                 "init_std": big_std, "probe": True}),
        RunSpec("z-loss", f"same, router z-loss x {cfg.z_loss_coef:g}",
                cfg.model_config(vocab_size, z_loss_coef=cfg.z_loss_coef, **common), cfg.unstable_lr, big,
                {"z_loss_coef": cfg.z_loss_coef, "lr": cfg.unstable_lr, "router_std": cfg.unstable_router_std}),
    ]


def measure(model: Transformer, data: Any, cfg: LabConfig) -> dict[str, Any]:
    """`bf16_routing_flips` of the trained model on the validation batches."""
    val = val_batches(data.val, cfg.batch_size, cfg.seq_len, max_batches_per_domain=cfg.eval_batches)
    return {"bf16_routing_flips": bf16_routing_flips(model, [x for batches in val.values() for x, _ in batches])}


def verdict(runs: Mapping[str, RunSummary], E: int) -> Verdict:
    """Without the cure the router logits grew (>= 1.5x, and more than with it), for every
    (broken, cured) pair; loss spikes, bf16 flips, the bf16 val-loss cost and whether the
    probe (``settings["probe"]``) spiked are reported."""
    out: list[str] = []
    ok = True
    probes = [r for r in runs.values() if r.settings.get("probe")]
    broken = [r for r in runs.values() if r.name.startswith("broken") and r not in probes]
    cured = [r for r in runs.values() if not r.name.startswith("broken") and r not in probes]
    for r in runs.values():
        end = f"stopped early at step {r.steps_done}: {r.stopped_reason}" if r.nan_steps else "finished"
        out.append(f"{r.name}: max |router logit| {r.max_router_logit or float('nan'):.1f} "
                   f"(peak {r.peak_router_logit or float('nan'):.1f}), {r.loss_spikes} loss spikes, "
                   f"{r.nan_steps} NaN/Inf steps, {end}")

    def growth(r: RunSummary) -> float:
        if r.nan_steps:
            return math.inf
        if r.max_router_logit is None or not r.initial_router_logit:
            return float("nan")
        return r.max_router_logit / r.initial_router_logit

    for b in broken:
        for c in cured:
            gb, gc = growth(b), growth(c)
            grew = gb >= 1.5 and gb > gc and (b.max_router_logit or math.inf) > (c.max_router_logit or 0)
            worse = b.loss_spikes + b.nan_steps > c.loss_spikes + c.nan_steps
            out.append(f"{b.name} vs {c.name}: router logits grew {gb:.1f}x over training without the cure, "
                       f"{gc:.1f}x with it -> {'cure works' if grew else 'NO clear effect'}; loss "
                       f"{'spiked/diverged more' if worse else 'did not spike more'} without the cure")
            ok &= grew
    for r in probes:
        spiked = r.loss_spikes + r.nan_steps > 0
        out.append(f"{r.name} (a knob the literature ties to spikes): {r.loss_spikes} loss spikes, {r.nan_steps} "
                   f"NaN/Inf steps -> {'it SPIKED' if spiked else 'no spike'}; val loss "
                   f"{r.val_loss if r.val_loss is not None else float('nan'):.3f}")
    for r in runs.values():
        if r.bf16_routing_flips is not None:
            out.append(f"{r.name}: a bf16 router would choose a different top-k set for "
                       f"{r.bf16_routing_flips:.1%} of (token, layer) pairs than this float32 one"
                       + (" (this run's router was bf16)" if r.settings.get("router_dtype") == "bfloat16" else ""))
    bf16 = runs.get("broken-bf16-router")
    fp32 = runs.get("broken-no-zloss")
    if bf16 and fp32 and bf16.val_loss is not None and fp32.val_loss is not None:
        out.append(f"bf16 router vs float32 router (both without z-loss): val loss {bf16.val_loss:.3f} vs "
                   f"{fp32.val_loss:.3f} ({bf16.val_loss - fp32.val_loss:+.3f})")
    return Verdict(out, ok)


EXPERIMENT = Experiment(
    name="instability",
    runs=runs,
    verdict=verdict,
    reads=("max_router_logit", "peak_router_logit", "initial_router_logit", "loss_spikes", "nan_steps",
           "steps_done", "stopped_reason", "bf16_routing_flips", "val_loss", "settings"),
    plots=(
        MetricPlot(name="max_router_logit", key="max_router_logit", file="max_router_logit.png", reduce="max",
                   log=True, ylabel="max |router logit|", title="instability: largest router logit per step"),
    ),
    measure=measure,
)
