"""Generation: cache == no cache, == transformers greedy, batched == one by one."""

from __future__ import annotations

import pytest
import torch

from moelab.errors import ConfigError
from moelab.hf import from_pretrained
from moelab.infer.generate import generate, left_pad
from moelab.model import KVCache

from .conftest import CharTokenizer, V, make_hf

PROMPTS = [[5, 9, 1, 33, 2, 7], [11, 4], [60, 3, 3, 8, 21, 13, 40, 2, 17]]


def _cache(model, B, S):
    c = model.cfg
    return KVCache(n_layers=c.n_layers, batch_size=B, max_len=S, n_kv_heads=c.kv_heads, head_dim=c.dim_head,
                   dtype=model.embed_tokens.weight.dtype)


@torch.no_grad()
def test_cached_decode_equals_full_forward_every_step(pair):
    """Left-padded batch: each cached one-token step gives the logits of an uncached
    forward of that row alone over its whole sequence."""
    _, model = pair
    ids_BL, mask_BL = left_pad(PROMPTS)
    B, L = ids_BL.shape
    steps = 6
    cache = _cache(model, B, L + steps)
    pos = (mask_BL.cumsum(-1) - 1).clamp_min(0)
    logits = model(ids_BL, positions=pos, attention_mask=mask_BL, cache=cache, last_only=True).logits[:, -1]
    seqs = [list(p) for p in PROMPTS]
    mask = mask_BL
    next_pos = pos[:, -1:] + 1
    for step in range(steps):
        for b in range(B):
            full = model(torch.tensor([seqs[b]])).logits[0, -1]
            assert (full - logits[b]).abs().max() <= 1e-5, (step, b)
        tok = logits.argmax(-1)
        for b in range(B):
            seqs[b].append(int(tok[b]))
        mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype)], 1)
        logits = model(tok[:, None], positions=next_pos, attention_mask=mask, cache=cache, last_only=True).logits[:, -1]
        next_pos = next_pos + 1


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_greedy_equals_transformers_generate(tmp_path, family):
    hf = make_hf(family, seed=3)
    hf.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path)
    ours = generate(model, PROMPTS, max_new_tokens=12).token_ids
    for prompt, got in zip(PROMPTS, ours, strict=True):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):].tolist()
        assert got == ref


def test_batched_equals_one_by_one(pair):
    _, model = pair
    batched = generate(model, PROMPTS, max_new_tokens=10, record_routing=True)
    for i, p in enumerate(PROMPTS):
        alone = generate(model, [p], max_new_tokens=10, record_routing=True)
        assert alone.token_ids[0] == batched.token_ids[i]
        assert [r.experts for r in alone.routing[0]] == [r.experts for r in batched.routing[i]]


def test_sampling_seeded_and_filters(pair):
    _, model = pair
    a = generate(model, PROMPTS, max_new_tokens=8, temperature=1.0, seed=1).token_ids
    assert a == generate(model, PROMPTS, max_new_tokens=8, temperature=1.0, seed=1).token_ids
    assert a != generate(model, PROMPTS, max_new_tokens=8, temperature=1.0, seed=2).token_ids
    greedy = generate(model, PROMPTS, max_new_tokens=8).token_ids
    assert generate(model, PROMPTS, max_new_tokens=8, temperature=0.7, top_k=1, seed=5).token_ids == greedy
    assert generate(model, PROMPTS, max_new_tokens=8, temperature=0.7, top_p=1e-6, seed=5).token_ids == greedy


def test_stop_token_and_stop_string(pair):
    _, model = pair
    free = generate(model, [PROMPTS[0]], max_new_tokens=10, tokenizer=CharTokenizer())
    ids, text = free.token_ids[0], free.texts[0]
    assert text == CharTokenizer().decode(ids) and free.finish_reasons == ["length"]
    stop = generate(model, [PROMPTS[0]], max_new_tokens=10, stop_token_ids=[ids[3]])
    first = ids.index(ids[3])
    assert stop.token_ids[0] == ids[: first + 1] and stop.finish_reasons == ["stop_token"]
    s = text[4:6]
    streamed = []
    cut = generate(model, [PROMPTS[0]], max_new_tokens=10, stop_strings=[s], tokenizer=CharTokenizer(),
                   stream=lambda row, tok, delta: streamed.append(delta))
    assert cut.texts[0] == text[: text.find(s)] and cut.finish_reasons == ["stop_string"]
    assert "".join(streamed) == cut.texts[0]
    assert cut.token_ids[0] == ids[: len(cut.token_ids[0])]


def test_routing_record_matches_full_forward(pair):
    _, model = pair
    res = generate(model, PROMPTS[:2], max_new_tokens=5, record_routing=True)
    K = model.cfg.moe.top_k
    for b, prompt in enumerate(PROMPTS[:2]):
        seq = prompt + res.token_ids[b]
        with torch.no_grad():
            full = model(torch.tensor([seq]), return_routing=True).routing
        assert len(res.routing[b]) == 5
        for j, tr in enumerate(res.routing[b]):
            producer = len(prompt) - 1 + j  # the position whose output was sampled
            for layer in model.cfg.moe_layers:
                assert len(tr.experts[layer]) == K
                assert tr.experts[layer] == full[layer].expert_idx[producer].tolist()
                assert sum(tr.weights[layer]) == pytest.approx(1.0, abs=1e-5)


def test_bad_requests(pair):
    _, model = pair
    with pytest.raises(ConfigError, match="max_seq_len"):
        generate(model, [[1] * 250], max_new_tokens=10)
    with pytest.raises(ConfigError, match="prompt 1 is empty"):
        generate(model, [[1], []], max_new_tokens=1)
    with pytest.raises(ConfigError, match=f"vocab_size={V}"):
        generate(model, [[V]], max_new_tokens=1)
    with pytest.raises(ConfigError, match="temperature"):
        generate(model, [[1]], max_new_tokens=1, temperature=-1)
    with pytest.raises(ConfigError, match="tokenizer"):
        generate(model, [[1]], max_new_tokens=1, stop_strings=["x"])
    assert generate(model, [[1]], max_new_tokens=0).token_ids == [[]]
