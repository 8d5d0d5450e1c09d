"""``collapse``: routing collapse, and the two cures.

Trained LMs' hidden states share a large common component (anisotropy), so a router row
aligned with it prefers some experts for *every* token. With no load-balancing loss the
favoured experts get all the gradient and improve, the starved ones never get picked
again (with renormalised top-k weights a dead expert's logit gets no gradient at all):
the rich get richer (Shazeer et al. 2017, §4). We build that state explicitly
(`skew_router`) and train from it: broken = no aux loss; cures = the aux loss (Switch,
eq. 4) and DeepSeek-V3's aux-loss-free bias balancing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from moelab.errors import ConfigError
from moelab.lab.config import LabConfig
from moelab.lab.experiments.base import Experiment, MetricPlot, RunSpec, Verdict
from moelab.lab.run_summary import RunSummary
from moelab.model import Transformer


@torch.no_grad()
def skew_router(model: Transformer, *, strength: float, favoured: Sequence[int] = (0, 1), seed: int = 0) -> None:
    """Put a model into the "rich get richer" state: every token prefers `favoured` experts.

    Adds a shared direction ``m`` (unit vector) to every token embedding, as large as the
    typical embedding itself, and adds ``beta * m`` to the favoured experts' router rows,
    with ``beta`` chosen so their logits are about `strength` above the others at init
    (the first favoured expert gets the full advantage, the next ones slightly less, so
    first and second choices are both taken). A shared component in hidden states is what
    trained transformers have anyway (anisotropy); here it is made deterministic.
    """
    cfg = model.cfg
    D = cfg.d_model
    g = torch.Generator().manual_seed(seed + 7919)
    m_D = torch.randn(D, generator=g)
    m_D /= m_D.norm()
    emb = model.embed_tokens.weight
    typical = emb.norm(dim=1).mean()
    emb.add_(typical * m_D)
    # After RMSNorm a vector of norm sqrt(D) (RMS 1) whose m-component is ~1/sqrt(2) of it.
    along_m = math.sqrt(D) / math.sqrt(2.0)
    for moe in model.moe_layers:
        for rank, e in enumerate(favoured):
            if e >= moe.cfg.num_experts:
                raise ConfigError(f"skew_router: favoured expert {e} >= num_experts={moe.cfg.num_experts}")
            moe.router.weight[e] += (strength * (1.0 - 0.15 * rank) / along_m) * m_D


def runs(cfg: LabConfig, vocab_size: int) -> list[RunSpec]:
    """No balancing loss from a skewed router, then the same init with each cure."""
    skew = lambda m: skew_router(m, strength=cfg.skew_strength, seed=cfg.seed)  # noqa: E731
    return [
        RunSpec("broken-no-aux", "softmax top-k router skewed at init, no balancing loss",
                cfg.model_config(vocab_size, aux_loss_coef=0.0), cfg.lr, skew,
                {"router": "softmax", "aux_loss_coef": 0.0}),
        RunSpec("aux-loss", f"same init, load-balancing loss x {cfg.aux_loss_coef:g}",
                cfg.model_config(vocab_size, aux_loss_coef=cfg.aux_loss_coef), cfg.lr, skew,
                {"router": "softmax", "aux_loss_coef": cfg.aux_loss_coef}),
        RunSpec("aux-free-bias", f"same init, sigmoid router + aux-loss-free bias (rate {cfg.bias_update_rate:g})",
                cfg.model_config(vocab_size, aux_loss_coef=0.0, router="sigmoid",
                                 bias_update_rate=cfg.bias_update_rate),
                cfg.lr, skew,
                {"router": "sigmoid", "aux_loss_coef": 0.0, "bias_update_rate": cfg.bias_update_rate}),
    ]


def verdict(runs: Mapping[str, RunSummary], E: int) -> Verdict:
    """A broken run collapsed (a dead expert, or the busiest takes >= 3x uniform); each cure
    undid it (no dead expert, busiest share <= 0.6x the broken run's)."""
    uniform = 1.0 / E
    out: list[str] = []
    ok = True
    broken_share = max((r.busiest_expert_share or 0.0 for r in runs.values() if r.name.startswith("broken")),
                       default=1.0)
    for r in runs.values():
        share = r.busiest_expert_share if r.busiest_expert_share is not None else float("nan")
        dead = r.dead_experts or 0
        collapsed = dead > 0 or share >= 3 * uniform
        balanced = share <= 1.5 * uniform and dead == 0
        state = "COLLAPSED" if collapsed else ("balanced" if balanced else "imbalanced, no dead experts")
        out.append(f"{r.name}: busiest expert takes {share:.3f} of assignments ({share / uniform:.1f}x uniform "
                   f"1/{E}), load CV {r.load_cv or 0:.2f}, {dead} dead experts -> {state}")
        if r.name.startswith("broken"):
            ok &= collapsed
        else:
            # The cure must undo the collapse: no dead expert, busiest share well below the broken run's.
            ok &= dead == 0 and share <= 0.6 * broken_share
    return Verdict(out, ok)


EXPERIMENT = Experiment(
    name="collapse",
    runs=runs,
    verdict=verdict,
    reads=("busiest_expert_share", "dead_experts", "load_cv"),
    plots=(
        MetricPlot(name="busiest_share", key="busiest_expert_share", file="busiest_share.png", reduce="max",
                   per_layer=True, uniform_line=True, ylabel="busiest expert's share",
                   title="collapse: share of assignments on the busiest expert, per layer"),
        MetricPlot(name="dead_experts", key="dead_experts", file="dead_experts.png", reduce="sum",
                   ylabel="dead experts (all layers)", title="collapse: experts with no token in a step"),
        MetricPlot(name="load_cv", key="load_cv", file="load_cv.png", reduce="mean",
                   ylabel="load CV (mean over layers)", title="collapse: coefficient of variation of expert load"),
    ),
)
