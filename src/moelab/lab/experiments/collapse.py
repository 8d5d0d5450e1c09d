"""``collapse``: routing collapse, what it costs, and what the two cures cost.

Trained LMs' hidden states share a large common component (anisotropy), so a router row
aligned with it prefers some experts for *every* token. With no load-balancing loss the
favoured experts get all the gradient and improve, the starved ones never get picked
again (with renormalised top-k weights a dead expert's logit gets no gradient at all):
the rich get richer (Shazeer et al. 2017, §4). We build that state explicitly
(`skew_router`) and train from it: broken = no aux loss; cures = the aux loss (Switch,
eq. 4) and DeepSeek-V3's aux-loss-free bias balancing.

What the experiment measures, and its verdict judges (`verdict`; docs/lab.md has the rules):

- **collapse**: the broken run's busiest-expert share and dead experts;
- **the capacity it wastes**: a top-K router that uses about K experts is a dense FFN of
  width K*F, so a dense model of that width (``dense-active``, the matched-active-FLOPs
  model) trains on the same batches beside it, and the balanced cure's validation curve
  is compared with the collapsed one (`crossing_step`: where it passes);
- **its system costs**, on held-out tokens (`moelab.lab.imbalance`): the share of
  assignments a capacity factor of 1.25 drops, and the expert-parallel step-time factor
  for EP = 2, 4, 8;
- **the cures' own costs**: the aux coefficient swept (0 = the broken run) against the
  aux-free bias, and the aux loss from an unskewed init (``unskewed-*``), which says how
  much of the aux loss's quality cost is the skewed init fighting it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from moelab.data import val_batches
from moelab.errors import ConfigError
from moelab.lab import plots
from moelab.lab.config import LabConfig
from moelab.lab.experiments.base import Experiment, MetricPlot, RunSpec, Verdict
from moelab.lab.imbalance import measure_routing_costs
from moelab.lab.run_summary import RunSummary, crossing_step
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


# Run roles (``RunSpec.settings["role"]``), what the verdict reads each run as.
BROKEN, CURE, SWEEP, DENSE, CONTROL = "broken", "cure", "sweep", "dense", "control"


def aux_run_name(coef: float, aux_loss_coef: float) -> str:
    """The skewed softmax run with balance-loss coefficient `coef`: 0 is the broken run,
    the config's coefficient is the "aux-loss" cure, the others are the sweep's."""
    if coef == 0:
        return "broken-no-aux"
    return "aux-loss" if coef == aux_loss_coef else f"aux-loss-{coef:g}"


def runs(cfg: LabConfig, vocab_size: int) -> list[RunSpec]:
    """No balancing loss from a skewed router; the same init with each cure and with the
    swept aux coefficients; the dense model of the width a collapsed top-K router uses
    (K*F); the aux loss from an unskewed init."""
    if cfg.aux_loss_coef == 0:  # the cure would be the broken run
        raise ConfigError("LabConfig.aux_loss_coef must be > 0 for the collapse experiment (it is the cure's)")
    skew = lambda m: skew_router(m, strength=cfg.skew_strength, seed=cfg.seed)  # noqa: E731
    balancing = lambda c: "no balancing loss" if c == 0 else f"load-balancing loss x {c:g}"  # noqa: E731

    def aux_run(c: float, role: str) -> RunSpec:
        return RunSpec(aux_run_name(c, cfg.aux_loss_coef), f"softmax top-k router skewed at init, {balancing(c)}",
                       cfg.model_config(vocab_size, aux_loss_coef=c), cfg.lr, skew,
                       {"role": role, "router": "softmax", "aux_loss_coef": c, "skewed": True})

    # d_ff = K * d_expert (`LabConfig.model_config`): the width of the K experts a collapsed
    # router keeps using; the same embedding shift as the skewed runs (there is no router).
    dense_cfg = replace(cfg.model_config(vocab_size), moe=None)
    specs = [
        aux_run(0.0, BROKEN),
        aux_run(cfg.aux_loss_coef, CURE),
        RunSpec("aux-free-bias", f"same init, sigmoid router + aux-loss-free bias (rate {cfg.bias_update_rate:g})",
                cfg.model_config(vocab_size, aux_loss_coef=0.0, router="sigmoid",
                                 bias_update_rate=cfg.bias_update_rate),
                cfg.lr, skew,
                {"role": CURE, "router": "sigmoid", "aux_loss_coef": 0.0, "bias_update_rate": cfg.bias_update_rate,
                 "skewed": True}),
        RunSpec("dense-active", f"dense FFN of width top_k x d_expert = {dense_cfg.d_ff}, same init shift",
                dense_cfg, cfg.lr, skew, {"role": DENSE, "d_ff": dense_cfg.d_ff, "skewed": True}),
    ]
    specs += [aux_run(c, SWEEP) for c in sorted(set(cfg.aux_sweep) - {0.0, cfg.aux_loss_coef})]
    for c in (0.0, cfg.aux_loss_coef):
        specs.append(RunSpec(f"unskewed-{'no-aux' if c == 0 else 'aux-loss'}", f"default router init, {balancing(c)}",
                             cfg.model_config(vocab_size, aux_loss_coef=c), cfg.lr, None,
                             {"role": CONTROL, "router": "softmax", "aux_loss_coef": c, "skewed": False}))
    return specs


def mixed_val_batches(data: Any, cfg: LabConfig) -> list[torch.Tensor]:
    """The validation sequences of every domain, shuffled together (seeded) into batches of
    ``batch_size``: mixed like a training batch. (A batch of one domain's text routes
    less evenly, since experts specialise by domain; it is not what a training step's
    capacity sees.)"""
    val = val_batches(data.val, cfg.batch_size, cfg.seq_len, max_batches_per_domain=cfg.eval_batches)
    xs = [x for batches in val.values() for x, _ in batches]
    if len({x.shape[1] for x in xs}) > 1:  # a domain shorter than one window: batches as they are
        return xs
    seqs_NT = torch.cat(xs)
    g = torch.Generator().manual_seed(cfg.seed + 15485863)
    seqs_NT = seqs_NT[torch.randperm(seqs_NT.shape[0], generator=g)]
    return list(seqs_NT.split(cfg.batch_size))


def measure(model: Transformer, data: Any, cfg: LabConfig) -> dict[str, Any]:
    """The trained routers' `RoutingCosts` on mixed validation batches (none for dense)."""
    costs = measure_routing_costs(model, mixed_val_batches(data, cfg),
                                  capacity_factor=cfg.cost_capacity_factor, ep_sizes=cfg.ep_sizes)
    if costs is None:
        return {}
    c = asdict(costs)
    return {"drop_capacity_factor": c["capacity_factor"], "dropped_at_capacity": c["dropped_fraction"],
            "ep_step_factor": c["ep_step_factor"], "effective_experts": c["effective_experts"]}


COST_FIELDS = ("dropped_at_capacity", "ep_step_factor", "effective_experts", "val_loss")


def _role(r: RunSummary) -> str:
    # Summaries built without the role (older experiment.json files) read by name.
    return r.settings.get("role") or (BROKEN if r.name.startswith("broken") else CURE)


def _state(r: RunSummary, E: int) -> tuple[bool, bool, str]:
    uniform = 1.0 / E
    share = r.busiest_expert_share if r.busiest_expert_share is not None else float("nan")
    dead = r.dead_experts or 0
    collapsed = dead > 0 or share >= 3 * uniform
    balanced = share <= 1.5 * uniform and dead == 0
    state = "COLLAPSED" if collapsed else ("balanced" if balanced else "imbalanced, no dead experts")
    return collapsed, balanced, (f"{r.name}: busiest expert takes {share:.3f} of assignments "
                                 f"({share / uniform:.1f}x uniform 1/{E}), load CV {r.load_cv or 0:.2f}, "
                                 f"{dead} dead experts -> {state}")


def _costs(r: RunSummary) -> str:
    ep = ", ".join(f"EP={k} x{v:.2f}" for k, v in (r.ep_step_factor or {}).items())
    return (f"{r.name}: drops {r.dropped_at_capacity:.1%} of held-out assignments at capacity factor "
            f"{r.drop_capacity_factor:g}; expert-parallel step {ep} (max/mean device load); "
            f"{r.effective_experts:.1f} experts in effective use")


# The verdict's rules, by number (`Verdict.rules` says which held).
RULES = {1: "collapse measured", 2: "the cures undo it", 3: "costs measured", 4: "collapse costs the system",
         5: "collapse wastes capacity (val loss)", 6: "collapsed MoE ~ its dense twin",
         7: "aux-free bias is the cheaper cure"}


def verdict(runs: Mapping[str, RunSummary], E: int) -> Verdict:
    """Judge the lesson, rule by rule (each a line; every rule must hold to pass):

    1. collapse measured: the broken run has a dead expert or its busiest expert takes
       >= 3x the uniform share;
    2. every cure undid it: no dead expert, busiest share <= 0.6x the broken run's;
    3. the costs were measured: the broken run and every cure have a val loss, a drop
       rate at the capacity factor and the expert-parallel step factors (a missing
       figure fails the verdict: an unmeasured cost is not a shown one);
    4. collapse costs the system: the broken run drops more at that capacity than every
       cure, and its step factor at the largest EP size is higher than every cure's;
    5. collapse wastes capacity: the best balanced cure's final val loss is below the
       broken run's (and the step where its curve passes is reported);
    6. ... and moves the MoE toward a dense model of its active width: the broken run's
       val loss is nearer ``dense-active``'s than the best balanced cure's is (the share
       of the balanced MoE's gain over the dense twin that the collapsed one keeps is
       reported);
    7. the cures' own cost: the aux-free bias reaches balance at a val loss no worse
       than every aux-loss run that balanced.

    The aux sweep and the unskewed controls are reported (their lines say what the
    skewed init does to the aux loss's cost), not judged.
    """
    out: list[str] = []
    rules: dict[int, bool] = {}  # rule number -> held
    by_role: dict[str, list[RunSummary]] = {}
    for r in runs.values():
        by_role.setdefault(_role(r), []).append(r)
    broken = (by_role.get(BROKEN) or [None])[0]
    cures = by_role.get(CURE, [])
    if broken is None or not cures:
        return Verdict([f"cannot judge: the experiment needs the broken run and a cure; got {sorted(runs)}"], False)
    for r in runs.values():
        if _role(r) != DENSE:
            out.append(_state(r, E)[2])
    collapsed, _, _ = _state(broken, E)
    rules[1] = collapsed
    out.append(f"[1] collapse {'measured' if collapsed else 'NOT seen'} in {broken.name}")
    broken_share = broken.busiest_expert_share or 1.0
    undone = [c for c in cures if (c.dead_experts or 0) == 0 and c.busiest_expert_share is not None
              and c.busiest_expert_share <= 0.6 * broken_share]
    rules[2] = len(undone) == len(cures)
    out.append(f"[2] cures that undid the collapse: {', '.join(c.name for c in undone) or 'none'}"
               + ("" if len(undone) == len(cures) else f"; NOT: {', '.join(c.name for c in cures if c not in undone)}"))

    missing = {r.name: [f for f in COST_FIELDS if getattr(r, f) is None] for r in [broken, *cures]}
    missing = {k: v for k, v in missing.items() if v}
    if missing:
        out.append("[3] costs NOT measured: " + "; ".join(f"{k} lacks {', '.join(v)}" for k, v in missing.items()))
        return Verdict(out, False, rules | {3: False})
    out.append("[3] costs measured for the broken run and every cure")
    for r in [broken, *cures]:
        out.append(_costs(r))
    top_ep = max(broken.ep_step_factor, key=int, default=None)
    drops_more = all(broken.dropped_at_capacity > c.dropped_at_capacity for c in cures)
    slower = top_ep is not None and all(broken.ep_step_factor[top_ep] > (c.ep_step_factor or {}).get(top_ep, math.inf)
                                        for c in cures)
    rules[3], rules[4] = True, drops_more and slower
    out.append(f"[4] collapse {'costs' if drops_more and slower else 'does NOT clearly cost'} the system: drops "
               f"{broken.dropped_at_capacity:.1%} vs {', '.join(f'{c.dropped_at_capacity:.1%}' for c in cures)} "
               f"for the cures; EP={top_ep} step x{(broken.ep_step_factor or {}).get(top_ep, math.nan):.2f} vs "
               f"{', '.join(f'x{(c.ep_step_factor or {}).get(top_ep, math.nan):.2f}' for c in cures)}")

    best = min(undone or cures, key=lambda c: c.val_loss)
    cross = crossing_step(best.val_curve, broken.val_curve)
    wasted = best.val_loss < broken.val_loss
    rules[5] = wasted
    out.append(f"[5] at step {broken.steps_done} {best.name} (cured) has val loss {best.val_loss:.3f} vs the "
               f"collapsed {broken.val_loss:.3f} ({best.val_loss - broken.val_loss:+.3f}): "
               + (f"collapse wastes capacity; the balanced curve passes the collapsed one at step {cross}" if wasted
                  else "the collapsed run is still ahead: this horizon is too short to show the capacity it "
                  "wastes (docs/lab.md: `--scale long`)"))
    dense = (by_role.get(DENSE) or [None])[0]
    if dense is None or dense.val_loss is None:
        rules[6] = False
        out.append("[6] dense-active NOT run (or not finished): the dense twin is not measured")
    else:
        like_dense = abs(broken.val_loss - dense.val_loss) < abs(best.val_loss - dense.val_loss)
        rules[6] = like_dense
        gain = dense.val_loss - best.val_loss
        kept = (f"; of the {gain:.3f} nats the balanced MoE gains over it, the collapsed one keeps "
                f"{(dense.val_loss - broken.val_loss) / gain:.0%}" if gain > 0 else
                "; the balanced MoE does not beat its dense twin at this horizon")
        out.append(f"[6] {dense.name} (width {dense.settings.get('d_ff', '?')}) val loss {dense.val_loss:.3f}: the "
                   f"collapsed MoE ({broken.val_loss:.3f}) is {'nearer' if like_dense else 'NOT nearer'} to it "
                   f"than the balanced MoE ({best.val_loss:.3f}) is{kept}")

    # The aux coefficient sweep, 0 = the broken run; then the aux-free bias against it.
    swept = sorted((r for r in runs.values() if r.settings.get("skewed") and r.settings.get("router") == "softmax"
                    and r.val_loss is not None), key=lambda r: r.settings.get("aux_loss_coef", 0.0))
    for r in swept:
        out.append(f"aux coefficient {r.settings.get('aux_loss_coef', 0.0):g}: busiest share "
                   f"{r.busiest_expert_share or math.nan:.3f}, val loss {r.val_loss:.3f}")
    free = runs.get("aux-free-bias")
    aux_balanced = [r for r in swept if r.settings.get("aux_loss_coef", 0.0) > 0 and (r.dead_experts or 0) == 0
                    and (r.busiest_expert_share or 1.0) <= 0.6 * broken_share]
    if free is None or free not in undone or not aux_balanced:
        rules[7] = False
        out.append("[7] cannot compare the cures' costs: the aux-free run or a balanced aux-loss run is missing "
                   "or did not balance")
    else:
        cheaper = all(free.val_loss <= r.val_loss for r in aux_balanced)
        rules[7] = cheaper
        out.append(f"[7] the aux-free bias balances at val loss {free.val_loss:.3f}; the aux-loss runs that balance: "
                   + ", ".join(f"{r.settings['aux_loss_coef']:g} -> {r.val_loss:.3f} ({r.val_loss - free.val_loss:+.3f})"
                               for r in aux_balanced)
                   + (" -> the aux-free bias is the cheaper cure" if cheaper else " -> the aux-free bias is NOT cheaper"))
    controls = {r.settings.get("aux_loss_coef"): r for r in by_role.get(CONTROL, []) if r.val_loss is not None}
    aux = runs.get("aux-loss")
    if aux is not None and aux.val_loss is not None and len(controls) == 2:
        coef = aux.settings["aux_loss_coef"]
        c0, c1 = controls[0.0], controls[coef]
        # Where along training the skewed aux run is furthest behind the broken one.
        theirs = {int(st): v for st, v in broken.val_curve}
        gaps = [(v - theirs[int(st)], int(st)) for st, v in aux.val_curve if int(st) in theirs]
        worst = max(gaps, default=(math.nan, -1))
        plain, skewed = c1.val_loss - c0.val_loss, aux.val_loss - broken.val_loss
        # "Explains": the skewed cost is more than twice the plain one and at least 0.05 nats more.
        why = ("the skewed init is what makes it costly" if skewed > 2 * max(plain, 0.0) + 0.05
               else "the skewed init does not explain its cost")
        out.append(f"the aux loss x{coef:g} costs {plain:+.3f} vs no aux loss from the unskewed init "
                   f"({c1.val_loss:.3f} vs {c0.val_loss:.3f}) and {skewed:+.3f} from the skewed one "
                   f"({aux.val_loss:.3f} vs {broken.val_loss:.3f}; furthest behind, {worst[0]:+.3f}, at step "
                   f"{worst[1]}): {why}")
    return Verdict(out, len(rules) == len(RULES) and all(rules.values()), rules)


def summary_plots(runs: Mapping[str, RunSummary], out: Path, E: int) -> dict[str, Path]:
    """Balance against quality: each MoE run's busiest-expert share (x uniform) and val loss."""
    points = {r.name: (r.busiest_expert_share * E, r.val_loss) for r in runs.values()
              if r.busiest_expert_share is not None and r.val_loss is not None}
    if not points:
        return {}
    return {"tradeoff": plots.plot_tradeoff(
        points, out / "balance_vs_loss.png", xlabel="busiest expert's share (x uniform 1/E)",
        ylabel="val loss (nats/token)", vline=1.0, vline_label="balanced",
        title="collapse: balance vs quality (aux coefficient sweep, aux-free bias, controls)")}


EXPERIMENT = Experiment(
    name="collapse",
    runs=runs,
    verdict=verdict,
    reads=("busiest_expert_share", "dead_experts", "load_cv", "val_loss", "val_curve", "steps_done", "settings",
           "dropped_at_capacity", "drop_capacity_factor", "ep_step_factor", "effective_experts"),
    plots=(
        MetricPlot(name="busiest_share", key="busiest_expert_share", file="busiest_share.png", reduce="max",
                   per_layer=True, uniform_line=True, ylabel="busiest expert's share",
                   title="collapse: share of assignments on the busiest expert, per layer"),
        MetricPlot(name="dead_experts", key="dead_experts", file="dead_experts.png", reduce="sum",
                   ylabel="dead experts (all layers)", title="collapse: experts with no token in a step"),
        MetricPlot(name="load_cv", key="load_cv", file="load_cv.png", reduce="mean",
                   ylabel="load CV (mean over layers)", title="collapse: coefficient of variation of expert load"),
    ),
    measure=measure,
    summary_plots=summary_plots,
)
