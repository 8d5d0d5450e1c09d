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
