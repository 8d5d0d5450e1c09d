"""The decoder: layer placement, attention against a naive reference, cache == no cache."""

from __future__ import annotations

import math

import pytest
import torch

from moelab.errors import ConfigError
from moelab.model import PRESETS, KVCache, ModelConfig, Transformer, get_preset
from moelab.model.cache import prefix_attention_mask
from moelab.model.layers import apply_rope, rope_cos_sin
from moelab.moe import MoE, MoEConfig, active_ffn_hidden


def tiny_cfg(**kw) -> ModelConfig:
    moe = MoEConfig(d_model=32, d_expert=16, num_experts=4, top_k=2)
    base = dict(vocab_size=97, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=48, moe=moe, max_seq_len=64)
    return ModelConfig(**(base | kw))


def naive_attention_block(attn, x_BTD, positions, window=None):
    """Obvious attention: explicit scores, explicit causal(+window) mask, repeat K/V heads."""
    cfg = attn.cfg
    B, T, _ = x_BTD.shape
    H, Hkv, Dh = cfg.n_heads, cfg.kv_heads, cfg.dim_head
    q = attn.q_proj(x_BTD).view(B, T, H, Dh).transpose(1, 2)
    k = attn.k_proj(x_BTD).view(B, T, Hkv, Dh).transpose(1, 2)
    v = attn.v_proj(x_BTD).view(B, T, Hkv, Dh).transpose(1, 2)
    cos, sin = rope_cos_sin(positions, Dh, cfg.rope_theta, x_BTD.dtype)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k = k.repeat_interleave(H // Hkv, dim=1)
    v = v.repeat_interleave(H // Hkv, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(Dh)
    i = torch.arange(T).unsqueeze(1)
    j = torch.arange(T).unsqueeze(0)
    allowed = j <= i
    if window is not None:
        allowed &= (i - j) < window
    scores = scores.masked_fill(~allowed, float("-inf"))
    y = torch.softmax(scores, dim=-1) @ v
    return attn.o_proj(y.transpose(1, 2).reshape(B, T, H * Dh))


@pytest.mark.parametrize("window", [None, 3])
def test_attention_matches_naive_reference(window):
    torch.manual_seed(0)
    cfg = tiny_cfg(sliding_window=window).with_(moe=None)
    model = Transformer(cfg).double()
    attn = model.layers[0].self_attn
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    pos = torch.arange(9).unsqueeze(0).expand(2, 9)
    cos, sin = rope_cos_sin(pos, cfg.dim_head, cfg.rope_theta, x.dtype)
    mask = prefix_attention_mask(2, 9, 0, cfg.sliding_window, None, x.device)
    got = attn(x, cos, sin, mask)
    torch.testing.assert_close(got, naive_attention_block(attn, x, pos, window), rtol=1e-10, atol=1e-10)


def test_moe_layer_placement():
    cfg = tiny_cfg(n_layers=6, first_dense_layers=1, moe_layer_freq=2)
    assert cfg.moe_layers == [2, 4]
    model = Transformer(cfg)
    assert [isinstance(b.mlp, MoE) for b in model.layers] == [False, False, True, False, True, False]
    assert tiny_cfg(moe=None).moe_layers == []


@pytest.mark.parametrize("window", [None, 4])
def test_cached_decode_equals_full_forward(window):
    torch.manual_seed(0)
    cfg = tiny_cfg(sliding_window=window)
    model = Transformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 11))
    full = model(ids).logits
    cache = KVCache(n_layers=cfg.n_layers, batch_size=2, max_len=16, n_kv_heads=cfg.kv_heads, head_dim=cfg.dim_head)
    steps = [model(ids[:, :4], cache=cache).logits]
    for t in range(4, 11):
        steps.append(model(ids[:, t : t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_cached_decode_with_positions_past_the_rope_table():
    """Caller-chosen positions beyond the cache's RoPE table are computed directly, not mis-indexed."""
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = Transformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 6))
    pos = torch.arange(6).expand(2, 6) + 40  # the cache below holds 8 positions
    full = model(ids, positions=pos).logits
    cache = KVCache(n_layers=cfg.n_layers, batch_size=2, max_len=8, n_kv_heads=cfg.kv_heads, head_dim=cfg.dim_head)
    steps = [model(ids[:, :3], positions=pos[:, :3], cache=cache).logits]
    for t in range(3, 6):
        steps.append(model(ids[:, t : t + 1], positions=pos[:, t : t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_output_losses_and_stats():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = Transformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    out = model(ids[:, :-1], ids[:, 1:], return_routing=True)
    assert out.logits.shape == (2, 7, cfg.vocab_size)
    assert set(out.layer_stats) == {0, 1, 2} and set(out.routing) == {0, 1, 2}
    for stats in out.layer_stats.values():
        assert int(stats.tokens_per_expert.sum()) == 14 * 2
    assert out.routing[0].expert_idx.shape == (14, 2)
    # Summed per layer (never concatenated): each layer's balanced value is ~1.
    assert 3.0 <= float(out.aux_loss.detach()) < 3 * cfg.moe.num_experts
    expected = cfg.moe.aux_loss_coef * out.aux_loss + cfg.moe.z_loss_coef * out.z_loss
    torch.testing.assert_close(out.moe_loss, expected)
    torch.testing.assert_close(out.loss, out.lm_loss + out.moe_loss)
    out.loss.backward()
    router_grads = [b.mlp.router.weight.grad for b in model.layers]
    assert all(g is not None and g.abs().sum() > 0 for g in router_grads)


def test_tied_embeddings_counted_once():
    cfg = tiny_cfg(tie_embeddings=True)
    model = Transformer(cfg)
    assert model.lm_head.weight is model.embed_tokens.weight
    untied = Transformer(tiny_cfg())
    assert untied.num_params() - model.num_params() == cfg.vocab_size * cfg.d_model


def test_presets_build_and_dense_matches_active_width():
    for name, cfg in PRESETS.items():
        assert get_preset(name) is cfg
        if name.endswith("-dense"):
            moe_cfg = PRESETS[name.removesuffix("-dense") + "-moe"].moe
            assert cfg.d_ff == active_ffn_hidden(moe_cfg)
    with pytest.raises(ConfigError, match="unknown model preset"):
        get_preset("nope")


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(n_heads=4, n_kv_heads=3), "multiple of n_kv_heads"),
        (dict(d_model=30, moe=None), "not divisible by n_heads"),
        (dict(first_dense_layers=9), "first_dense_layers"),
        (dict(qk_norm="layer"), "qk_norm"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(moe=MoEConfig(d_model=16, d_expert=8, num_experts=4)), "moe.d_model"),
    ],
)
def test_config_validation(kw, message):
    with pytest.raises(ConfigError, match=message):
        tiny_cfg(**kw)


def test_config_round_trip():
    cfg = tiny_cfg(first_dense_layers=1)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown field"):
        ModelConfig.from_dict(cfg.to_dict() | {"bogus": 1})


def test_bad_input_ids_give_clear_errors():
    model = Transformer(tiny_cfg())
    with pytest.raises(ValueError, match="vocab_size"):
        model(torch.tensor([[0, 97]]))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        model(torch.zeros(5, dtype=torch.long))
    x = torch.zeros(1, 4, dtype=torch.long)
    for return_logits in (True, False):
        with pytest.raises(ValueError, match=r"targets must be in \[0, vocab_size=97\)"):
            model(x, targets=torch.tensor([[1, 2, 97, -100]]), return_logits=return_logits)
        with pytest.raises(ValueError, match="targets must have the shape"):
            model(x, targets=torch.tensor([[1, 2]]), return_logits=return_logits)
    assert model(x, targets=torch.tensor([[1, -100, 96, 0]]), return_logits=False).lm_loss.isfinite()
