"""Formula-level invariants of the parameter, FLOP and memory functions."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from moelab.accounting.flops import forward_flops_per_token, mean_attended_keys
from moelab.accounting.memory import kv_cache_bytes, min_gpus
from moelab.accounting.params import count_params, mlp_params
from moelab.accounting.spec import ArchSpec, AttentionSpec, LayerSpec, MLPSpec, MoESpec
from moelab.errors import ConfigError


def _spec(d: int, f: int, e: int, k: int, layers: int = 2, window: int | None = None) -> ArchSpec:
    attn = AttentionSpec(n_heads=4, n_kv_heads=2, head_dim=d // 4, window=window)
    ffn = MoESpec(num_experts=e, top_k=k, expert=MLPSpec(d_ff=f)) if e > 1 else MLPSpec(d_ff=f)
    return ArchSpec(name="t", vocab_size=100, d_model=d,
                    layers=tuple(LayerSpec(attention=attn, ffn=ffn) for _ in range(layers)))


@given(st.sampled_from([16, 32, 64]), st.integers(1, 64), st.integers(2, 16), st.data())
def test_moe_counts(d, f, e, data):
    k = data.draw(st.integers(1, e))
    c = count_params(_spec(d, f, e, k))
    dense = count_params(_spec(d, f, 1, 1))
    # A top-k MoE costs k experts per token and holds e of them, plus the router.
    assert c.total - dense.total == 2 * ((e - 1) * 3 * d * f + d * e)
    assert c.active - dense.active == 2 * ((k - 1) * 3 * d * f + d * e)
    assert c.active_no_embed == c.active - 2 * 100 * d


def test_one_expert_moe_flops_equal_dense_plus_router():
    moe, dense = _spec(32, 48, 2, 2), _spec(32, 48, 1, 1)
    cm, cd = count_params(moe), count_params(dense)
    extra = 2 * (3 * 32 * 48 + 2 * 32)  # second expert + router, in each of 2 layers
    assert forward_flops_per_token(moe, cm, 64) - forward_flops_per_token(dense, cd, 64) == 2 * extra


def test_plain_mlp_and_biases():
    assert mlp_params(MLPSpec(d_ff=10, gated=False), 4) == 80
    assert mlp_params(MLPSpec(d_ff=10, gated=True, bias=True), 4) == 120 + 20 + 4


@pytest.mark.parametrize("context,window", [(1, None), (7, None), (10, 3), (10, 10), (4, 100)])
def test_mean_attended_keys_matches_loop(context, window):
    keys = [min(t, window or t) for t in range(1, context + 1)]
    assert mean_attended_keys(context, window) == pytest.approx(sum(keys) / context)


def test_kv_cache_window_caps_context():
    full, windowed = _spec(32, 8, 1, 1), _spec(32, 8, 1, 1, window=16)
    kw = dict(context=64, batch=3, dtype="bf16")
    per_token = 2 * 2 * 8 * 2 * 2  # 2 layers x (k, v) x 2 heads x 8 dims x 2 bytes
    assert kv_cache_bytes(full, **kw) == 3 * 64 * per_token
    assert kv_cache_bytes(windowed, **kw) == 3 * 16 * per_token


def test_mla_kv_cache_is_latent():
    att = AttentionSpec(kind="mla", n_heads=8, q_lora_rank=16, kv_lora_rank=32,
                        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
    spec = ArchSpec(name="m", vocab_size=10, d_model=32,
                    layers=(LayerSpec(attention=att, ffn=MLPSpec(d_ff=8)),))
    assert kv_cache_bytes(spec, context=10, batch=1, dtype="fp32") == 10 * 36 * 4


def test_min_gpus():
    assert min_gpus(72e9, 80) == 1
    assert min_gpus(72.1e9, 80) == 2
    with pytest.raises(ConfigError):
        min_gpus(1, 0)


def test_spec_validation_names_field():
    with pytest.raises(ConfigError, match="top_k"):
        MoESpec(num_experts=2, top_k=3, expert=MLPSpec(d_ff=4))
    with pytest.raises(ConfigError, match="n_kv_heads"):
        AttentionSpec(n_heads=4, n_kv_heads=3, head_dim=8)
