"""Greedy generation with int8 experts equals generation with their dequantised weights.

The int8 kernel sees bf16 activations, so the two models' logits differ by bf16 rounding.
Greedy tokens are then equal wherever the top logit leads the next by more than twice
the largest logit difference. On a tiny random model some step usually has a closer call
than that (measured: over 6 seeds x 3 prompts x 12 steps, the worst margin/difference
ratio ranged from 0.08, a flipped token, to 32). So the model is made to have clear
margins: a small vocabulary (16), weights of std 0.05, and a seed (3) whose worst ratio
is ~25 on these prompts; the test asserts the margin it relies on (4x the difference, 2x being enough),
so a build where that no longer holds fails loudly rather than by chance.
"""

from __future__ import annotations

import copy

import torch

from moelab.infer.generate import generate
from moelab.model import ModelConfig, Transformer
from moelab.moe import MoE, MoEConfig
from moelab.quant import QuantizedExperts, quantize_model

V = 16
PROMPTS = [[5, 9, 1, 1, 2, 7], [11, 4], [12, 3, 3, 8, 5, 13, 0, 2, 15]]


def _model() -> Transformer:
    moe = MoEConfig(d_model=64, d_expert=32, num_experts=4, top_k=2)
    cfg = ModelConfig(vocab_size=V, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, moe=moe,
                      max_seq_len=64)
    torch.manual_seed(3)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05) if p.dim() > 1 else p.normal_(1, 0.2)
    return model


def test_int8_greedy_generation_equals_the_dequantised_model():
    quantized = _model()
    quantize_model(quantized, "int8")
    reference = copy.deepcopy(quantized)
    for layer in reference.modules():
        if isinstance(layer, MoE):
            assert isinstance(layer.experts, QuantizedExperts)
            layer.experts = layer.experts.dequantized()
    steps = 12
    out_q = generate(quantized, PROMPTS, max_new_tokens=steps)
    out_ref = generate(reference, PROMPTS, max_new_tokens=steps)
    assert out_q.token_ids == out_ref.token_ids

    # The margin this relies on: at every step the reference's top logit leads the next by
    # far more than the two models' logits differ.
    with torch.inference_mode():
        for prompt, new in zip(PROMPTS, out_ref.token_ids, strict=True):
            ids = torch.tensor([prompt + new[:-1]])
            logits_q = quantized(ids, telemetry=False).logits[0, len(prompt) - 1:]
            logits_ref = reference(ids, telemetry=False).logits[0, len(prompt) - 1:]
            top2 = logits_ref.topk(2, dim=-1).values
            margin = float((top2[:, 0] - top2[:, 1]).min())
            diff = float((logits_q - logits_ref).abs().max())
            assert margin > 4 * diff, (margin, diff)
