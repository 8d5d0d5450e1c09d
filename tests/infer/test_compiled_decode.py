"""The static-shape decode step (`moelab.infer.compiled`) against the eager cached decode.

`decode_one_token` run eagerly is the reference of the compiled path: it must give the
eager model's logits step by step (left-padded batches, sliding window, shared experts).
The slow tests compile it and check that `generate(compile=True)` writes the same greedy
tokens as the eager `generate`, and that a weight change is not served by a stale graph.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moelab.errors import ConfigError
from moelab.infer.compiled import decode_one_token, static_cache_len
from moelab.infer.generate import generate, left_pad
from moelab.model import KVCache, ModelConfig, Transformer
from moelab.moe import MoEConfig

PROMPTS = [[5, 9, 1, 33, 2, 7], [11, 4], [60, 3, 3, 8, 21, 13, 40, 2, 17]]
V = 64


def tiny_model(*, sliding_window: int | None = None, shared: bool = False, seed: int = 0) -> Transformer:
    moe = MoEConfig(d_model=32, d_expert=24, num_experts=4, top_k=2, num_shared_experts=int(shared),
                    shared_expert_gate=shared)
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=48, moe=moe,
                      first_dense_layers=1, sliding_window=sliding_window, max_seq_len=128)
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # larger weights than the init: routing and tokens vary more
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.normal_(1, 0.2)
    return model


def test_static_cache_len():
    assert static_cache_len(10, 512) == 64
    assert static_cache_len(64, 512) == 64
    assert static_cache_len(65, 512) == 128
    assert static_cache_len(300, 400) == 400  # capped at max_seq_len, never below what is needed
    assert static_cache_len(100, 80) == 100


@pytest.mark.parametrize("sliding_window,shared", [(None, False), (4, False), (None, True)])
@torch.inference_mode()
def test_static_step_equals_eager_step(sliding_window, shared):
    """Eagerly, the static step (whole cache + mask, tensor column) gives the eager cached
    decode's logits at every step, for a left-padded batch."""
    model = tiny_model(sliding_window=sliding_window, shared=shared)
    c = model.cfg
    ids_BL, mask_BL = left_pad(PROMPTS)
    B, L = ids_BL.shape
    steps = 7
    S = static_cache_len(L + steps, c.max_seq_len)
    caches = [KVCache(n_layers=c.n_layers, batch_size=B, max_len=n, n_kv_heads=c.kv_heads, head_dim=c.dim_head)
              for n in (L + steps, S)]
    pos_BL = (mask_BL.cumsum(-1) - 1).clamp_min(0)
    prefill = [model(ids_BL, positions=pos_BL, attention_mask=mask_BL, cache=cache, last_only=True).logits[:, -1]
               for cache in caches]
    torch.testing.assert_close(prefill[0], prefill[1], rtol=0, atol=0)
    eager_cache, static_buffers = caches
    model.rope_table(static_buffers, torch.float32)
    valid_BS = torch.ones(B, S, dtype=torch.bool)
    valid_BS[:, :L] = mask_BL.bool()
    static_cache = static_buffers.static_view(valid_BS)
    mask_BS = torch.cat([mask_BL, torch.ones(B, steps, dtype=mask_BL.dtype)], 1)
    tok_B = prefill[0].argmax(-1)
    pos_B1 = pos_BL[:, -1:]
    for step in range(steps):
        col = L + step
        pos_B1 = pos_B1 + 1
        eager = model(tok_B[:, None], positions=pos_B1, attention_mask=mask_BS[:, : col + 1], cache=eager_cache,
                      last_only=True).logits[:, -1]
        static = decode_one_token(model, tok_B[:, None], pos_B1, static_cache)
        assert int(static_cache.col_1) == col + 1
        torch.testing.assert_close(static, eager, rtol=1e-5, atol=1e-5, msg=f"step {step}")
        tok_B = eager.argmax(-1)


def test_compile_bad_arguments():
    model = tiny_model()
    with pytest.raises(ConfigError, match="compile must be True or False"):
        generate(model, [[1, 2]], max_new_tokens=2, compile="yes")
    with pytest.raises(ConfigError, match="compile=True does not support record_routing"):
        generate(model, [[1, 2]], max_new_tokens=2, compile=True, record_routing=True)
    for change, match in (({"capacity_factor": 1.5}, "capacity_factor=1.5"), ({"impl": "loop"}, "impl='grouped'")):
        cfg = model.cfg.with_(moe=dataclasses.replace(model.cfg.moe, **change))
        with pytest.raises(ConfigError, match=match):
            generate(Transformer(cfg), [[1, 2]], max_new_tokens=2, compile=True)


@pytest.mark.slow
def test_compiled_generate_equals_eager():
    """Batched prompts of different lengths and a single prompt (one compile per batch
    size): the compiled decode writes the eager greedy tokens."""
    model = tiny_model(sliding_window=8)
    for prompts in (PROMPTS, PROMPTS[1:2]):
        eager = generate(model, prompts, max_new_tokens=12)
        compiled = generate(model, prompts, max_new_tokens=12, compile=True)
        assert compiled.token_ids == eager.token_ids
        # The first compiled step (which compiles, once per batch size) is timed apart, not in the rate.
        assert compiled.extras["compile_s"] > 0 and compiled.decode_steps == 12 - 2
        assert eager.decode_steps == 12 - 1 and "compile_s" not in eager.extras
        assert compiled.finish_reasons == eager.finish_reasons
    # Sampling goes through the same logits: same seed, same tokens.
    sampled = dict(max_new_tokens=12, temperature=1.0, top_k=20, seed=3)
    assert generate(model, PROMPTS, **sampled, compile=True).token_ids == generate(model, PROMPTS, **sampled).token_ids


@pytest.mark.slow
def test_compiled_generate_sees_new_weights():
    """Freezing bakes weights into the graph: after an in-place weight change the next
    compiled call must rebuild it, not decode with the old weights."""
    model = tiny_model(shared=True)
    before = generate(model, PROMPTS, max_new_tokens=10, compile=True).token_ids
    assert before == generate(model, PROMPTS, max_new_tokens=10).token_ids
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)
        model.layers[1].mlp.experts.down_proj.mul_(2.0)
    after = generate(model, PROMPTS, max_new_tokens=10, compile=True).token_ids
    assert after == generate(model, PROMPTS, max_new_tokens=10).token_ids
    assert after != before


@pytest.mark.slow
def test_compiled_generate_of_a_bf16_model_equals_eager():
    """A bf16 model compiles (its experts' backend asks the CPU once, outside the graph)."""
    model = tiny_model().to(torch.bfloat16)
    assert generate(model, PROMPTS[:1], max_new_tokens=8, compile=True).token_ids == \
        generate(model, PROMPTS[:1], max_new_tokens=8).token_ids


@pytest.mark.slow
def test_compiled_decode_raises_non_finite_router_error():
    """The routers' check inside the compiled step is an assert; the step raises the same
    `NonFiniteRouterError` as eager decoding. Every token but the prompt's has a NaN
    embedding and every logit is 0 (greedy: token 0), so the prefill is finite and the first
    compiled step is not."""
    from moelab.moe import NonFiniteRouterError

    model = tiny_model()
    with torch.no_grad():
        keep = model.embed_tokens.weight[[1, 2, 3]].clone()
        model.embed_tokens.weight.fill_(float("nan"))
        model.embed_tokens.weight[[1, 2, 3]] = keep
        model.lm_head.weight.zero_()
    for compile in (False, True):
        with pytest.raises(NonFiniteRouterError, match="router logits contain NaN/Inf"):
            generate(model, [[1, 2, 3]], max_new_tokens=4, compile=compile)
