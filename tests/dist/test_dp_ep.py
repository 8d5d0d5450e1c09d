"""A 2 x 2 mesh (dp=2, ep=2, four gloo processes): the dp-group rule for expert gradients.

Ranks (0, 1) and (2, 3) each hold one copy of the experts; expert gradients are summed
over dp (ranks 0+2 and 1+3) only, replicated ones over all four. Four processes on two
cores take a while, so this is one launch with two cases, marked slow.
"""

from __future__ import annotations

import pytest
import torch

from moelab.dist.launch import launch
from moelab.dist.parallel import expert_param_names

from .conftest import HERE, env, load_worker

worker = load_worker()
CASES = ["softmax", "sigmoid_groups_capacity"]


@pytest.fixture(scope="module")
def ranks4(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp2ep2")
    launch([str(HERE / "ep_worker.py"), str(out), *CASES], 4, timeout_s=240, env=env(EP="2"))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_dp2_ep2_matches_one_process(ranks4, name):
    model, x, y = worker.build_case(name)
    ref = model(x, targets=y)
    ref.loss.backward()
    experts = expert_param_names(model)
    worst = 0.0
    for r in range(4):
        got = torch.load(ranks4 / f"{name}.rank{r}.pt")
        assert got["ep_size"] == 2 and got["ep_rank"] == r % 2
        a, b = got["rows"]
        worst = max(worst, (got["logits"] - ref.logits[a:b]).abs().max().item())
        assert abs(float(got["loss"]) - float(ref.loss.detach())) < 1e-6 * float(ref.loss.detach())
        for n, p in model.named_parameters():
            if p.grad is None:
                continue
            want = p.grad
            if n in experts:
                L = want.shape[0] // 2
                want = want[got["ep_rank"] * L:(got["ep_rank"] + 1) * L]
            worst = max(worst, (got["grads"][n] - want).abs().max().item())
    print(f"dp=2 x ep=2, {name}: max abs diff {worst:.3g}")
    assert worst < 1e-9
