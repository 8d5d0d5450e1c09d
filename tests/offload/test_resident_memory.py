"""The memory contract, measured: a child process that generates with offloaded experts
peaks (VmHWM) at what the fully resident child peaks at, less the expert weights, plus
the budget (and a few MiB)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from moelab.model import ModelConfig, Transformer
from moelab.moe import MoEConfig
from moelab.rundir import save_model

CHILD = r"""
import json, sys
def status():
    return {k: int(v.split()[0]) * 1024 for k, _, v in (l.partition(":") for l in open("/proc/self/status"))
            if k in ("VmHWM", "VmRSS")}
import torch
torch.set_num_threads(1)
from moelab.infer.generate import generate
from moelab.hf import load_any
from moelab.offload import load_offloaded
before = status()["VmRSS"]
budget = int(sys.argv[2])
if budget:
    off = load_offloaded(sys.argv[1], expert_memory=budget)
    model, stats = off.model, off.store.stats
else:
    model, stats = load_any(sys.argv[1]).model, None  # a float or a quantised run
ids = generate(model, [[1, 2, 3, 4, 5, 6, 7, 8]], max_new_tokens=8).token_ids
print(json.dumps({"growth": status()["VmHWM"] - before, "ids": ids,
                  "peak": stats().peak_resident_bytes if stats else None}))
"""


def _child(run_dir, budget: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(run_dir), str(budget)], check=True, capture_output=True,
                         text=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("fmt", [None, "int8"])
def test_peak_rss_is_non_expert_weights_plus_budget(tmp_path, fmt):
    moe = MoEConfig(d_model=256, d_expert=512, num_experts=8, top_k=2)
    cfg = ModelConfig(vocab_size=512, d_model=256, n_layers=4, n_heads=4, d_ff=512, moe=moe, max_seq_len=64)
    model = Transformer(cfg).eval()
    non_expert = sum(p.numel() * 4 for n, p in model.named_parameters() if ".experts." not in n)  # ~3 MiB
    if fmt is None:
        run_dir = save_model(model, tmp_path / "run")
        one = 3 * 256 * 512 * 4
    else:  # the store holds int8 experts: 1 byte a weight and a bf16 scale a row
        from moelab.quant import quantize_model, save_quantized

        quantize_model(model, fmt)
        run_dir = save_quantized(model, tmp_path / "run", fmt=fmt)
        one = 3 * 256 * 512 + (2 * 512 + 256) * 2
    experts = 4 * 8 * one  # 48 MiB in float32, 12 in int8
    del model
    budget = 4 * one  # one expert per layer: 6 MiB
    off, resident = _child(run_dir, budget), _child(run_dir, 0)
    assert off["ids"] == resident["ids"] and off["peak"] <= budget
    # Both children also grow by what the first forward touches whatever the weights
    # (libtorch code pages, thread pools, allocator arenas: ~20 MB measured), so the
    # contract is checked against the resident child: the experts' bytes replaced by the
    # budget, give or take a few MiB (activations, the store's staging, page rounding).
    assert resident["growth"] >= non_expert + experts  # the check measures what it claims to
    assert off["growth"] <= resident["growth"] - experts + budget + 4 * 2**20, (off["growth"], resident["growth"])
