"""The load generator's arithmetic (the end-to-end run is in test_server_bench.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moelab.errors import ConfigError
from moelab.serve.loadgen import (
    LoadConfig,
    RequestResult,
    arrival_times,
    make_prompts,
    percentiles,
    summarize,
)


@pytest.mark.parametrize("n", [1, 2, 7, 100])
def test_percentiles_match_numpy(n):
    xs = list(np.random.default_rng(n).exponential(size=n))
    got = percentiles(xs)
    for p in (50, 90, 99):
        assert got[f"p{p}"] == pytest.approx(float(np.percentile(xs, p)))
    assert got["mean"] == pytest.approx(float(np.mean(xs)))
    assert percentiles([]) == {"mean": None, "p50": None, "p90": None, "p99": None}


def test_summarize_follows_the_vllm_definitions():
    ok = RequestResult(ok=True, status=200, sent_s=0.0, ttft_s=0.1, itl_s=[0.02, 0.04], e2e_s=0.16,
                       output_tokens=3, prompt_tokens=5)
    one = RequestResult(ok=True, status=200, sent_s=0.0, ttft_s=0.3, e2e_s=0.3, output_tokens=1, prompt_tokens=5)
    busy = RequestResult(ok=False, status=429, sent_s=0.0, error="HTTP 429: queue full")
    s = summarize([ok, one, busy], duration_s=2.0, client_cpu_s=0.5)
    assert (s["completed"], s["failed"], s["rejected_429"]) == (2, 1, 1)
    assert s["output_tok_per_s"] == pytest.approx(4 / 2.0) and s["req_per_s"] == pytest.approx(1.0)
    assert s["tpot_ms"]["mean"] == pytest.approx((0.16 - 0.1) / 2 * 1e3)  # a 1-token request has no TPOT
    assert s["ttft_ms"]["p50"] == pytest.approx(200.0)
    assert s["itl_ms"]["p50"] == pytest.approx(30.0)
    assert s["client_cpu_share"] == pytest.approx(0.25) and s["errors"] == ["HTTP 429: queue full"]


def test_prompts_and_poisson_arrivals():
    cfg = LoadConfig(base_url="http://x", num_prompts=4000, request_rate=8.0, input_len=5, prompt_vocab=50)
    ps = make_prompts(cfg)
    assert all(len(p) == 5 and all(2 <= t < 50 for t in p) for p in ps)
    assert ps == make_prompts(cfg)  # seeded
    t = arrival_times(cfg)
    gaps = np.diff(t)
    assert t[0] == 0 and (gaps >= 0).all()
    assert gaps.mean() == pytest.approx(1 / 8.0, rel=0.1)  # exponential gaps of mean 1/rate
    assert gaps.std() == pytest.approx(1 / 8.0, rel=0.15)  # ... and std 1/rate (not evenly spaced)
    assert arrival_times(LoadConfig(base_url="http://x", num_prompts=3)) == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("kw, field", [
    (dict(base_url="localhost:8000"), "--base-url"),
    (dict(num_prompts=0), "--num-prompts"),
    (dict(request_rate=0.0), "--request-rate"),
    (dict(max_concurrency=0), "--max-concurrency"),
    (dict(prompt_vocab=1), "--prompt-vocab"),
])
def test_bad_settings_name_the_flag(kw, field):
    with pytest.raises(ConfigError, match=field):
        LoadConfig(**{"base_url": "http://x", **kw})


def test_api_root():
    assert LoadConfig(base_url="http://h:1").api_root == "http://h:1/v1"
    assert LoadConfig(base_url="http://h:1/v1/").api_root == "http://h:1/v1"
    assert math.isinf(LoadConfig(base_url="http://h:1").request_rate)
