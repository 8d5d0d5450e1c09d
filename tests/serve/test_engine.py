"""The continuous-batching engine against its reference, `moelab.infer.generate` alone."""

from __future__ import annotations

import random
import threading

import pytest
import torch

from moelab.errors import ConfigError
from moelab.infer.generate import generate
from moelab.model import KVCache, Transformer
from moelab.model.presets import get_preset
from moelab.serve.engine import Engine, EngineConfig, run_to_completion
from moelab.serve.slots import Segment, SlotKVCache
from moelab.serve.types import EngineClosedError, GenerationRequest, QueueFullError

V = 256


class CharTokenizer:
    def decode(self, ids):
        return "".join(chr(ord("a") + i % 26) for i in ids)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = get_preset("tiny-moe").with_(vocab_size=V, max_seq_len=128)
    m = Transformer(cfg).eval()
    with torch.no_grad():  # larger weights: routing and logits vary a lot from token to token
        for p in m.parameters():
            if p.dim() > 1:
                p.mul_(5)
    return m


def prompts(seed: int, lengths) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (n,), generator=g).tolist() for n in lengths]


def tokens(events) -> list[int]:
    return [t for e in events for t in e.token_ids]


_ALONE: dict = {}


def alone(model, prompt, n, **kw) -> list[int]:
    """The reference: the request by itself through `generate` (memoised per test session)."""
    key = (id(model), tuple(prompt), n, tuple(sorted(kw.items())))
    if key not in _ALONE:
        _ALONE[key] = generate(model, [prompt], max_new_tokens=n, **kw).token_ids[0]
    return _ALONE[key]


@pytest.mark.parametrize("slots, budget", [(1, 8), (3, 8), (4, 64), (8, 512)])
def test_batching_is_invisible_greedy(model, slots, budget):
    """Any slot count and token budget (budget 8 chunks every prompt longer than 8)."""
    ps = prompts(1, (3, 17, 40, 9, 25, 1))
    news = [12, 5, 20, 30, 7, 15]
    engine = Engine(model, EngineConfig(max_num_seqs=slots, max_batch_tokens=budget))
    reqs = [GenerationRequest(prompt_ids=tuple(p), max_tokens=n) for p, n in zip(ps, news, strict=True)]
    events = run_to_completion(engine, reqs)
    for r, p, n in zip(reqs, ps, news, strict=True):
        assert tokens(events[r.request_id]) == alone(model, p, n)
        assert events[r.request_id][-1].finish_reason == "length"
    stats = engine.stats()
    assert stats.running == 0 and stats.finished == {"length": len(reqs)}
    assert stats.generation_tokens == sum(news)
    assert stats.prompt_tokens == sum(map(len, ps))
    if slots > 1:  # requests really shared decode steps
        assert stats.decode_rows > stats.decode_steps


def test_attention_sinks_and_sliding_windows_serve_like_generate():
    """gpt-oss's attention: a sink logit per head, sliding-window layers beside full ones."""
    torch.manual_seed(1)
    cfg = get_preset("tiny-moe").with_(vocab_size=V, max_seq_len=128, attn_sinks=True, sliding_window=8,
                                       sliding_layers=(0, 2))
    m = Transformer(cfg).eval()
    with torch.no_grad():
        for layer in m.layers:
            layer.self_attn.sinks.normal_(0, 2.0)  # sinks that take real probability mass
        for p in m.parameters():
            if p.dim() > 1:
                p.mul_(5)
    ps = prompts(3, (3, 17, 30, 9))
    news = [12, 20, 6, 15]
    engine = Engine(m, EngineConfig(max_num_seqs=3, max_batch_tokens=16))
    reqs = [GenerationRequest(prompt_ids=tuple(p), max_tokens=n) for p, n in zip(ps, news, strict=True)]
    events = run_to_completion(engine, reqs)
    for r, p, n in zip(reqs, ps, news, strict=True):
        assert tokens(events[r.request_id]) == generate(m, [p], max_new_tokens=n).token_ids[0]
    # The sinks matter: without them the same prompts decode differently.
    with torch.no_grad():
        for layer in m.layers:
            layer.self_attn.sinks.fill_(-1e4)
    assert any(generate(m, [p], max_new_tokens=n).token_ids[0] != tokens(events[r.request_id])
               for r, p, n in zip(reqs, ps, news, strict=True))


def test_packed_batch_equals_separate_caches(model):
    """The reference for `PackedBatch`: decoding rows of different lengths and two prefill
    chunks (one fresh, one continuing) in one packed forward give the logits each request
    gets from its own dynamic `KVCache`."""
    cfg = model.cfg
    ps = prompts(2, (5, 11, 2, 9, 12))
    kw = dict(n_layers=cfg.n_layers, n_kv_heads=cfg.kv_heads, head_dim=cfg.dim_head)
    slot_cache = SlotKVCache(slots=5, max_len=32, **kw)
    ref = []
    with torch.inference_mode():
        for s, p in enumerate(ps[:3]):  # three requests with their prompts in slots 0..2
            model(torch.tensor([p]), cache=slot_cache.packed([Segment(s, 0, len(p))]), telemetry=False)
        model(torch.tensor([ps[4][:5]]), cache=slot_cache.packed([Segment(4, 0, 5)]), telemetry=False)
        for p in ps[:3]:
            kv = KVCache(batch_size=1, max_len=32, **kw)
            model(torch.tensor([p]), cache=kv, telemetry=False)
            ref.append(model(torch.tensor([[7]]), cache=kv, telemetry=False).logits[0, -1])
        for p, n in ((ps[3], len(ps[3])), (ps[4], len(ps[4]))):
            ref.append(model(torch.tensor([p[:n]]), telemetry=False).logits[0, -1])
        segments = [Segment(0, 5, 1), Segment(1, 11, 1), Segment(2, 2, 1), Segment(3, 0, 9), Segment(4, 5, 7)]
        ids = [7, 7, 7, *ps[3], *ps[4][5:]]
        ends = torch.tensor([0, 1, 2, 3 + 9 - 1, len(ids) - 1])
        got = model(torch.tensor([ids]), cache=slot_cache.packed(segments), logits_at=ends, telemetry=False).logits[0]
    for i in range(len(ref)):
        torch.testing.assert_close(got[i], ref[i], atol=1e-5, rtol=1e-5)


def test_seeded_sampling_is_reproducible_and_batch_independent(model):
    ps = prompts(3, (6, 14, 3))
    kw = dict(temperature=0.9, top_p=0.95, top_k=50)
    reqs = [GenerationRequest(prompt_ids=tuple(p), max_tokens=10, seed=100 + i, **kw) for i, p in enumerate(ps)]
    events = run_to_completion(Engine(model, EngineConfig(max_num_seqs=3)), reqs)
    for i, (r, p) in enumerate(zip(reqs, ps, strict=True)):
        assert tokens(events[r.request_id]) == alone(model, p, 10, seed=100 + i, **kw)
    # Different seeds really sample differently (the test above could not fail otherwise).
    other = GenerationRequest(prompt_ids=tuple(ps[0]), max_tokens=10, seed=999, **kw)
    ev = run_to_completion(Engine(model), [other])
    assert tokens(ev[other.request_id]) != tokens(events[reqs[0].request_id])


def test_stop_token_and_stop_string(model):
    p = prompts(4, (8,))[0]
    free = alone(model, p, 12)
    engine = Engine(model, tokenizer=CharTokenizer())
    stop_tok = GenerationRequest(prompt_ids=tuple(p), max_tokens=12, stop_token_ids=(free[4],))
    text = CharTokenizer().decode(free)
    stop_str = GenerationRequest(prompt_ids=tuple(p), max_tokens=12, stop=(text[6:8],))
    events = run_to_completion(engine, [stop_tok, stop_str])
    ev = events[stop_tok.request_id]
    cut = free.index(free[4]) + 1
    assert tokens(ev) == free[:cut] and ev[-1].finish_reason == "stop"
    assert "".join(e.text for e in ev) == text[: cut - 1]  # the stop token's text is not shown
    ev = events[stop_str.request_id]
    shown = "".join(e.text for e in ev)
    assert ev[-1].finish_reason == "stop" and shown == text[: text.find(text[6:8])]


def test_abort_queued_and_running_frees_the_slot(model):
    ps = prompts(5, (4, 4, 4))
    engine = Engine(model, EngineConfig(max_num_seqs=1))
    got: dict[str, list] = {}
    reqs = [GenerationRequest(prompt_ids=tuple(p), max_tokens=50) for p in ps]
    for r in reqs:
        got[r.request_id] = []
        engine.submit(r, got[r.request_id].append)
    engine.step()
    engine.step()  # request 0 is running, 1 and 2 are queued
    assert engine.stats().running == 1 and engine.stats().waiting == 2
    engine.abort(reqs[0].request_id)
    engine.abort(reqs[2].request_id)
    engine.step()
    assert got[reqs[0].request_id][-1].finish_reason == "abort"
    assert got[reqs[2].request_id][-1].finish_reason == "abort" and tokens(got[reqs[2].request_id]) == []
    s = engine.stats()
    assert s.running == 1 and s.waiting == 0 and s.finished == {"abort": 2}  # request 1 took the slot
    while got[reqs[1].request_id][-1:] == [] or got[reqs[1].request_id][-1].finish_reason is None:
        engine.step()
    assert tokens(got[reqs[1].request_id]) == alone(model, ps[1], 50)


@pytest.mark.slow
def test_random_arrivals_and_aborts_keep_every_survivor_exact(model):
    """Slots are re-packed on every retire and promote; whatever the order, each request
    that is not aborted gets exactly its solo tokens."""
    rng = random.Random(0)
    engine = Engine(model, EngineConfig(max_num_seqs=4, max_batch_tokens=12))
    ps = prompts(6, [rng.randint(1, 30) for _ in range(12)])
    news = [rng.randint(1, 15) for _ in ps]
    reqs = [GenerationRequest(prompt_ids=tuple(p), max_tokens=n) for p, n in zip(ps, news, strict=True)]
    events: dict[str, list] = {r.request_id: [] for r in reqs}
    aborted = {reqs[i].request_id for i in (2, 5, 9)}
    pending = list(reqs)
    step = 0
    while pending or engine.stats().running or engine.stats().waiting:
        if pending and rng.random() < 0.5:
            r = pending.pop(0)
            engine.submit(r, events[r.request_id].append)
        for rid in aborted:
            if events[rid] and rng.random() < 0.3:
                engine.abort(rid)
        engine.step()
        step += 1
        assert step < 2000
    for r, p, n in zip(reqs, ps, news, strict=True):
        ev = events[r.request_id]
        assert ev[-1].finish_reason in ("length", "abort")
        if ev[-1].finish_reason == "length":
            assert tokens(ev) == alone(model, p, n)
        else:
            assert r.request_id in aborted


def test_expert_load_counts_every_routed_token(model):
    ps = prompts(7, (10, 4))
    engine = Engine(model, EngineConfig(max_num_seqs=2))
    run_to_completion(engine, [GenerationRequest(prompt_ids=tuple(p), max_tokens=6) for p in ps])
    s = engine.stats()
    K = model.cfg.moe.top_k
    # Every prompt token and every decoded token (all but each request's last) is routed once per layer.
    fed = sum(map(len, ps)) + 2 * (6 - 1)
    assert sorted(s.expert_tokens) == [i for i, b in enumerate(model.layers) if b.is_moe]
    for counts in s.expert_tokens.values():
        assert sum(counts) == K * fed and len(counts) == model.cfg.moe.num_experts


def test_routing_record_matches_generate(model):
    p = prompts(8, (9,))[0]
    req = GenerationRequest(prompt_ids=tuple(p), max_tokens=4, return_routing=True)
    ev = run_to_completion(Engine(model), [req])[req.request_id]
    ref = generate(model, [p], max_new_tokens=4, record_routing=True).routing[0]
    got = [r for e in ev for r in (e.routing or [])]
    assert len(got) == 4
    for g, r in zip(got, ref, strict=True):
        assert {k: v["experts"] for k, v in g.items()} == {str(k): v for k, v in r.experts.items()}


def test_bad_requests_are_refused_by_name(model):
    engine = Engine(model, EngineConfig(max_num_seqs=1, max_queue=1, max_len=64))
    with pytest.raises(ConfigError, match="exceeds the context of 64"):
        engine.submit(GenerationRequest(prompt_ids=(1,) * 60, max_tokens=5), print)
    with pytest.raises(ConfigError, match="prompt: token id 999"):
        engine.submit(GenerationRequest(prompt_ids=(1, 999), max_tokens=5), print)
    with pytest.raises(ConfigError, match="max_tokens"):
        GenerationRequest(prompt_ids=(1,), max_tokens=-1)
    with pytest.raises(ConfigError, match="top_p"):
        GenerationRequest(prompt_ids=(1,), max_tokens=1, top_p=1.5)
    with pytest.raises(ConfigError, match="max_batch_tokens"):
        EngineConfig(max_num_seqs=8, max_batch_tokens=4)
    with pytest.raises(ConfigError, match="max_len"):
        Engine(model, EngineConfig(max_len=4096))
    engine.submit(GenerationRequest(prompt_ids=(1,), max_tokens=5), lambda e: None)
    with pytest.raises(QueueFullError):
        engine.submit(GenerationRequest(prompt_ids=(1,), max_tokens=5), lambda e: None)


def test_zero_max_tokens_finishes_without_a_slot(model):
    req = GenerationRequest(prompt_ids=(3, 4), max_tokens=0)
    engine = Engine(model)
    ev = run_to_completion(engine, [req])[req.request_id]
    assert [e.finish_reason for e in ev] == ["length"] and engine.stats().steps == 0


def test_capacity_dropping_is_switched_off(model):
    import copy

    m = copy.deepcopy(model)
    for moe in m.moe_layers:
        moe.dispatcher.capacity_factor = 0.5
    Engine(m)
    assert all(moe.dispatcher.capacity_factor is None for moe in m.moe_layers)


def test_a_failing_step_ends_its_requests_with_error_and_the_engine_goes_on(model, monkeypatch):
    engine = Engine(model, EngineConfig(max_num_seqs=2))
    done = threading.Event()
    got: list = []

    def on_event(e):
        got.append(e)
        if e.finish_reason:
            done.set()

    real = engine._forward
    monkeypatch.setattr(engine, "_forward", lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    engine.start()
    try:
        engine.submit(GenerationRequest(prompt_ids=(1, 2), max_tokens=3), on_event)
        assert done.wait(10)
        assert got[-1].finish_reason == "error" and "boom" in got[-1].error
        monkeypatch.setattr(engine, "_forward", real)
        done.clear()
        engine.submit(GenerationRequest(prompt_ids=(1, 2), max_tokens=3), on_event)
        assert done.wait(10) and got[-1].finish_reason == "length"
    finally:
        engine.shutdown(drain_timeout_s=5)


def test_threaded_engine_drains_on_shutdown(model):
    engine = Engine(model, EngineConfig(max_num_seqs=2))
    engine.start()
    got: dict[str, list] = {}
    reqs = [GenerationRequest(prompt_ids=tuple(p), max_tokens=8) for p in prompts(9, (5, 7, 3))]
    for r in reqs:
        got[r.request_id] = []
        engine.submit(r, got[r.request_id].append)
    engine.shutdown(drain_timeout_s=30)
    for r in reqs:
        assert got[r.request_id][-1].finish_reason == "length" and len(tokens(got[r.request_id])) == 8
    with pytest.raises(EngineClosedError):
        engine.submit(reqs[0], print)


def test_shutdown_timeout_ends_running_requests_with_shutdown(model):
    engine = Engine(model, EngineConfig(max_num_seqs=1, max_len=128))
    started = threading.Event()
    got: list = []

    def on_event(e):
        got.append(e)
        started.set()

    engine.start()
    engine.submit(GenerationRequest(prompt_ids=(1,), max_tokens=120), on_event)
    assert started.wait(10)
    engine.shutdown(drain_timeout_s=0)
    assert got[-1].finish_reason == "shutdown" and len(tokens(got)) < 120


@pytest.mark.parametrize("fmt", ["int8", "bf16"])
def test_quantised_experts_serve_like_generate(model, fmt):
    """A quantised model (the memory issue's runtime) is served like any other: batched
    output equals `generate` alone on the same quantised model."""
    import copy

    from moelab.quant import quantize_model

    q = copy.deepcopy(model)
    quantize_model(q, fmt)
    ps = prompts(10, (7, 3, 12))
    reqs = [GenerationRequest(prompt_ids=tuple(p), max_tokens=6) for p in ps]
    events = run_to_completion(Engine(q, EngineConfig(max_num_seqs=3)), reqs)
    for r, p in zip(reqs, ps, strict=True):
        assert tokens(events[r.request_id]) == generate(q, [p], max_new_tokens=6).token_ids[0]


def test_dynamic_batching_waits_for_the_batch_and_gives_the_same_tokens(model):
    """The request-level batching that continuous batching replaced: a request arriving
    while a batch runs waits for the whole batch, even though a slot is free."""
    ps = prompts(11, (4, 6, 5))
    engine = Engine(model, EngineConfig(max_num_seqs=2, batching="dynamic"))
    long, short, late = (GenerationRequest(prompt_ids=tuple(p), max_tokens=n) for p, n in zip(ps, (12, 2, 3),
                                                                                              strict=True))
    got: dict[str, list] = {r.request_id: [] for r in (long, short, late)}
    for r in (long, short):
        engine.submit(r, got[r.request_id].append)
    for _ in range(3):
        engine.step()
    assert got[short.request_id][-1].finish_reason == "length"  # a slot is free now
    engine.submit(late, got[late.request_id].append)
    while got[long.request_id][-1].finish_reason is None:
        engine.step()
        assert not got[late.request_id]  # ... but the late request waits for the batch
    while not got[late.request_id] or got[late.request_id][-1].finish_reason is None:
        engine.step()
    for r, p in zip((long, short, late), ps, strict=True):
        assert tokens(got[r.request_id]) == alone(model, p, r.max_tokens)
    with pytest.raises(ConfigError, match="batching"):
        EngineConfig(batching="static")


def test_dynamic_batch_window_collects_late_arrivals(model):
    """A dynamic batch waits for more requests until it is full or its window has passed."""
    import time

    ps = prompts(12, (4, 6, 5))
    reqs = [GenerationRequest(prompt_ids=tuple(p), max_tokens=3) for p in ps]
    engine = Engine(model, EngineConfig(max_num_seqs=2, batching="dynamic", batch_window=600))
    engine.submit(reqs[0], lambda e: None)
    assert not engine.step()  # the window is open and the batch is not full: nothing runs
    engine.submit(reqs[1], lambda e: None)
    assert engine.step() and engine.stats().running == 2  # full: both start together
    late = Engine(model, EngineConfig(max_num_seqs=4, batching="dynamic", batch_window=0.05))
    late.submit(reqs[2], lambda e: None)
    time.sleep(0.1)  # the window has passed: the batch starts with what it has
    assert late.step() and late.stats().running == 1
