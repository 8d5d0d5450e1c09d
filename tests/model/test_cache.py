"""The decoder's cache protocol: the dynamic `KVCache` and its `StaticKVCache` view give
the same logits through the one `Transformer.forward`, and misuse is refused clearly."""

from __future__ import annotations

import pytest
import torch

from moelab.model import KVCache, ModelConfig, StaticKVCache, Transformer
from moelab.model.cache import causal_mask, prefix_attention_mask
from moelab.moe import MoEConfig


def _model() -> Transformer:
    torch.manual_seed(0)
    moe = MoEConfig(d_model=32, d_expert=16, num_experts=4, top_k=2)
    cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, moe=moe,
                      max_seq_len=64, sliding_window=5)
    return Transformer(cfg).double().eval()


def _cache(model: Transformer, B: int, S: int) -> KVCache:
    c = model.cfg
    return KVCache(n_layers=c.n_layers, batch_size=B, max_len=S, n_kv_heads=c.kv_heads, head_dim=c.dim_head,
                   dtype=torch.float64)


@torch.no_grad()
def test_static_view_continues_a_dynamic_prefill():
    """Prefill 6 tokens into a dynamic cache, then decode 3 more through the static view
    (a 2-token chunk, then 1): the logits of an uncached forward over the whole sequence."""
    model = _model()
    ids = torch.randint(0, 50, (2, 9))
    full = model(ids).logits
    cache = _cache(model, 2, 16)
    pre = model(ids[:, :6], cache=cache).logits
    torch.testing.assert_close(pre, full[:, :6], rtol=1e-10, atol=1e-10)
    static = cache.static_view(torch.ones(2, 16, dtype=torch.bool))
    pos = torch.arange(6, 9).expand(2, 3)
    a = model(ids[:, 6:8], positions=pos[:, :2], cache=static).logits
    b = model(ids[:, 8:9], positions=pos[:, 2:], cache=static).logits
    torch.testing.assert_close(torch.cat([a, b], 1), full[:, 6:], rtol=1e-10, atol=1e-10)
    assert int(static.col_1) == 9 and cache.length == 6  # the view advances itself only


def test_static_view_refuses_misuse():
    model = _model()
    cache = _cache(model, 2, 16)
    with pytest.raises(ValueError, match=r"key_valid_BS must be \[batch, max_len\]=\(2, 16\)"):
        cache.static_view(torch.ones(2, 15, dtype=torch.bool))
    static = cache.static_view(torch.ones(2, 16, dtype=torch.bool))
    ids = torch.randint(0, 50, (2, 1))
    with pytest.raises(ValueError, match="StaticKVCache needs positions="):
        model(ids, cache=static)
    with pytest.raises(ValueError, match="holds its own padding mask"):
        model(ids, positions=torch.zeros(2, 1, dtype=torch.long), cache=static, attention_mask=torch.ones(2, 1))
    assert isinstance(static, StaticKVCache)


def test_static_mask_equals_prefix_mask_over_the_filled_columns():
    """The static mask restricted to the filled columns is the dynamic one; the rest is False."""
    B, offset, T, S, window = 2, 5, 3, 12, 4
    valid = torch.ones(B, S, dtype=torch.bool)
    valid[0, :2] = False  # row 0 is left-padded
    dyn = prefix_attention_mask(B, T, offset, window, valid[:, : offset + T].long(), torch.device("cpu"))
    static = causal_mask(B, torch.arange(offset, offset + T), S, window, valid)
    assert torch.equal(static[..., : offset + T], dyn)
    assert not static[..., offset + T :].any()


@pytest.mark.parametrize("H,K,Dv", [(4, 2, 8), (4, 4, 8), (6, 1, 5)], ids=["gqa", "mha", "mqa-dv"])
def test_one_query_attention_equals_sdpa(H, K, Dv):
    """The compiled decode step's attention (one query per row, written as reductions)
    against SDPA, its reference: grouped-query heads, a padding mask, a value dim of its own."""
    from moelab.model.layers import one_query_attention

    g = torch.Generator().manual_seed(H * 10 + K)
    B, S, D = 3, 11, 8
    q = torch.randn(B, H, 1, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, K, S, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, K, S, Dv, generator=g, dtype=torch.float64)
    valid_BS = torch.rand(B, S, generator=g) > 0.3
    valid_BS[:, 0] = True
    mask = causal_mask(B, torch.tensor([S - 1]), S, None, valid_BS)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=H != K)
    torch.testing.assert_close(one_query_attention(q, k, v, mask), want)
