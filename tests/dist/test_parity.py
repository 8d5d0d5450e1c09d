"""EP=2 (two gloo processes) against one process on the same batch and weights.

One launch runs every case (process start-up dominates on 2 cores); each case is then
checked here against `LocalDispatcher` on the concatenated batch: the logits of each
rank's rows, the global loss, the aux and z losses, and **every** gradient -- replicated
parameters after the all-reduce over dp x ep, expert shards against their slice of the
single-process gradient. Most cases run in float64 and must agree to 1e-9 (the z-loss is
float32 by design, so its value to 1e-6); the ``*_fp32`` cases hold the issue's bar, 1e-5
in float32. ``-s`` prints the max abs difference of each case.
"""

from __future__ import annotations

import pytest
import torch

from moelab.dist.parallel import expert_param_names

from .conftest import load_worker

worker = load_worker()
NAMES = sorted(worker.CASES)


def tol(name: str) -> float:
    return 1e-5 if name.endswith("_fp32") else 1e-9


def _single(name):
    model, x, y = worker.build_case(name)
    out = model(x, targets=y)
    out.loss.backward()
    return model, out


@pytest.mark.parametrize("name", NAMES)
def test_outputs_losses_and_every_gradient_match_one_process(ranks, name):
    model, ref = _single(name)
    experts = expert_param_names(model)
    worst = 0.0
    for r in range(2):
        got = torch.load(ranks / f"{name}.rank{r}.pt")
        a, b = got["rows"]
        worst = max(worst, (got["logits"] - ref.logits[a:b]).abs().max().item())
        for key, want in (("loss", ref.loss.detach()), ("aux", ref.aux_loss.detach()), ("z", ref.z_loss.detach())):
            bound = max(tol(name), 1e-6 * abs(float(want))) if key in ("z", "loss") else tol(name)
            assert abs(float(got[key]) - float(want)) < bound, (key, float(got[key]), float(want))
        names = {n for n, p in model.named_parameters() if p.grad is not None}
        assert set(got["grads"]) == names  # every gradient, none missing, none extra
        for n, p in model.named_parameters():
            if p.grad is None:
                continue
            want = p.grad
            if n in experts:
                L = want.shape[0] // got["ep_size"]
                want = want[got["ep_rank"] * L:(got["ep_rank"] + 1) * L]
            assert got["grads"][n].shape == want.shape, n
            worst = max(worst, (got["grads"][n] - want).abs().max().item())
        for i, s in ref.layer_stats.items():  # telemetry is the global batch's
            assert torch.equal(got["tokens_per_expert"][i], s.tokens_per_expert)
    print(f"{name}: max abs diff {worst:.3g}")
    assert worst < tol(name), f"{name}: max abs diff {worst:.3g}"


def test_idle_rank_really_received_nothing(ranks):
    model, ref = _single("rank1_idle")
    for s in ref.layer_stats.values():
        assert s.tokens_per_expert[2:].sum() == 0 and s.tokens_per_expert[:2].sum() > 0


def test_capacity_case_really_drops(ranks):
    _, ref = _single("softmax_capacity_position")
    assert sum(int(s.dropped) for s in ref.layer_stats.values()) > 0
