"""`torch.compile` (the trainer's `--compile`) runs the MoE model: same loss, gradients flow.

Custom pieces (the expert FFN autograd Function, the chunked LM loss, the grouped-GEMM
shortcut that is eager-only) must all survive tracing; this caught `torch._grouped_mm`,
whose meta function takes bf16 only.
"""

from __future__ import annotations

import pytest
import torch

from moelab.model import ModelConfig, Transformer
from moelab.moe import MoEConfig


@pytest.mark.slow
def test_compiled_model_trains_like_eager():
    cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64,
                      moe=MoEConfig(d_model=32, d_expert=16, num_experts=4, top_k=2, z_loss_coef=1e-3))
    torch.manual_seed(0)
    eager = Transformer(cfg)
    compiled_model = Transformer(cfg)
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model)
    x = torch.randint(0, 97, (2, 16))
    y = torch.randint(0, 97, (2, 16))
    out_c = compiled(x, targets=y, return_logits=False)
    out_e = eager(x, targets=y, return_logits=False)
    torch.testing.assert_close(out_c.loss, out_e.loss, rtol=1e-5, atol=1e-5)
    out_c.loss.backward()
    out_e.loss.backward()
    for (name, pc), (_, pe) in zip(compiled_model.named_parameters(), eager.named_parameters(), strict=True):
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-4, atol=1e-6, msg=name)



@pytest.mark.slow
def test_compiled_training_does_not_recompile_per_routing(monkeypatch):
    """`train --compile` recompiled for every new set of tokens per expert (the eager kernel's
    ``counts.tolist()`` traced: guards such as ``counts[7] == 227`` and on the chunking, which
    depends on the counts); 20 tiny-moe steps took 117 s against 3 s eager. The expert FFN is
    an opaque op under compile now, with gradients, so train steps and no-grad evals with
    new routing reuse the graphs of the first ones, and the numbers are the eager ones."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from moelab.moe import cpu_kernels

    # Small chunks: the chunking (part of what the old trace guarded on) varies with the routing.
    monkeypatch.setattr(cpu_kernels, "CHUNK_BYTES", 2048)
    cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64,
                      moe=MoEConfig(d_model=32, d_expert=16, num_experts=4, top_k=2, z_loss_coef=1e-3))
    torch.manual_seed(0)
    eager = Transformer(cfg).train()
    compiled_model = Transformer(cfg).train()
    compiled_model.load_state_dict(eager.state_dict())
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(compiled_model)
    graphs = []
    for step in range(6):  # new random batches: new tokens per expert every time
        x, y = torch.randint(0, 97, (2, 32)), torch.randint(0, 97, (2, 32))
        with torch.autocast("cpu", dtype=torch.bfloat16):  # as `moelab train` runs on a bf16 CPU
            out_c = compiled(x, targets=y, return_logits=False)
            out_e = eager(x, targets=y, return_logits=False)
        # bf16: inductor rounds differently from eager (the fp32 test above compares gradients exactly)
        torch.testing.assert_close(out_c.loss, out_e.loss, rtol=2e-2, atol=2e-2)
        out_c.loss.backward()
        out_e.loss.backward()
        for (name, pc), (_, pe) in zip(compiled_model.named_parameters(), eager.named_parameters(), strict=True):
            torch.testing.assert_close(pc.grad, pe.grad, rtol=0.1, atol=2e-2, msg=f"step {step}: {name}")
        compiled_model.zero_grad()
        eager.zero_grad()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # the trainer's evaluation
            torch.testing.assert_close(compiled(x, targets=y, return_logits=False).lm_loss,
                                       eager(x, targets=y, return_logits=False).lm_loss, rtol=2e-2, atol=2e-2)
        graphs.append(counters["stats"]["unique_graphs"])
    # Round 0 compiles the train and the no-grad graphs; no round after it compiles anything.
    assert graphs == [graphs[0]] * 6, graphs
