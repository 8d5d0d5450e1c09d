"""A load generator for OpenAI-compatible servers (`moelab bench serve`).

Sends ``num_prompts`` streaming `/v1/completions` requests with Poisson arrivals
(``request_rate`` per second; ``inf`` sends them all at once) and at most
``max_concurrency`` in flight, and measures what vLLM's ``bench serve`` measures, with
the same definitions:

  - TTFT: request sent -> first chunk carrying a token (its text may be empty: held
    back while it may still become a stop string);
  - ITL: the gap between successive content chunks of a request (all gaps pooled);
  - TPOT: per request, ``(E2E - TTFT) / (output tokens - 1)``;
  - E2E: request sent -> last byte;
  - output tok/s: all output tokens / the benchmark's wall time; req/s likewise.

Prompts are token ids (the OpenAI API's ``prompt: [int, ...]`` form), drawn uniformly from
``[first_prompt_id, prompt_vocab)`` so that every prompt has exactly ``input_len``
tokens whatever the tokenizer; ``ignore_eos`` (a vLLM / moelab extension) makes every
request produce exactly ``output_len`` tokens, so runs are comparable across servers.

On a 2-core machine the client competes with the server for CPU, so the report includes
the client's own CPU time (user + system of this process) over the run.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import resource
import time
from dataclasses import asdict, dataclass, field

from moelab.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class LoadConfig:
    base_url: str  # e.g. http://127.0.0.1:8000 (with or without /v1)
    num_prompts: int = 32
    request_rate: float = math.inf  # requests per second (Poisson); inf: all at t=0
    max_concurrency: int | None = None  # requests in flight at most; None: unbounded
    input_len: int = 32
    output_len: int = 32
    seed: int = 0
    model: str | None = None  # None: the first model of GET /v1/models
    api_key: str | None = None
    prompt_vocab: int = 1000  # prompt token ids are drawn from [first_prompt_id, prompt_vocab)
    first_prompt_id: int = 2  # skip special tokens (moelab's tokenizer: 0 end of text, 1 pad)
    ignore_eos: bool = True
    timeout_s: float = 600.0  # per request
    max_duration_s: float | None = None  # stop sending new requests after this long

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"--base-url must start with http:// or https://, got {self.base_url!r}")
        for name in ("num_prompts", "input_len", "output_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= 1, got {v!r}")
        if not (self.request_rate > 0):
            raise ConfigError(f"--request-rate must be > 0 or inf, got {self.request_rate!r}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ConfigError(f"--max-concurrency must be >= 1, got {self.max_concurrency!r}")
        if not (0 <= self.first_prompt_id < self.prompt_vocab):
            raise ConfigError(f"--prompt-vocab must be > {self.first_prompt_id}, got {self.prompt_vocab!r}")

    @property
    def api_root(self) -> str:
        root = self.base_url.rstrip("/")
        return root if root.endswith("/v1") else root + "/v1"


@dataclass
class RequestResult:
    ok: bool
    status: int  # HTTP status (0: no response)
    sent_s: float  # since the benchmark started
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    e2e_s: float | None = None
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str | None = None


@dataclass
class LoadReport:
    config: dict
    summary: dict
    requests: list[RequestResult]

    def to_dict(self) -> dict:
        return {"config": self.config, "summary": self.summary, "requests": [asdict(r) for r in self.requests]}


def percentiles(values: list[float], ps=(50, 90, 99)) -> dict[str, float | None]:
    """``{"mean", "p50", ...}`` with linear interpolation between order statistics (numpy's
    default, as vLLM reports); None for an empty list."""
    out: dict[str, float | None] = {"mean": sum(values) / len(values) if values else None}
    xs = sorted(values)
    for p in ps:
        if not xs:
            out[f"p{p}"] = None
            continue
        pos = (len(xs) - 1) * p / 100
        lo, hi = math.floor(pos), math.ceil(pos)
        out[f"p{p}"] = xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
    return out


def summarize(results: list[RequestResult], duration_s: float, client_cpu_s: float) -> dict:
    """The report's numbers from the per-request results (pure: tested on made-up data)."""
    done = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in done)
    tpot = [(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) for r in done
            if r.output_tokens > 1 and r.ttft_s is not None and r.e2e_s is not None]

    def ms(values):
        return {k: (None if v is None else v * 1e3) for k, v in percentiles(values).items()}

    return {
        "completed": len(done),
        "failed": len(results) - len(done),
        "rejected_429": sum(r.status == 429 for r in results),
        "duration_s": duration_s,
        "output_tokens": out_tokens,
        "prompt_tokens": sum(r.prompt_tokens for r in done),
        "output_tok_per_s": out_tokens / duration_s if duration_s > 0 else None,
        "req_per_s": len(done) / duration_s if duration_s > 0 else None,
        "ttft_ms": ms([r.ttft_s for r in done if r.ttft_s is not None]),
        "tpot_ms": ms(tpot),
        "itl_ms": ms([g for r in done for g in r.itl_s]),
        "e2e_ms": ms([r.e2e_s for r in done if r.e2e_s is not None]),
        "client_cpu_s": client_cpu_s,
        "client_cpu_share": client_cpu_s / duration_s if duration_s > 0 else None,
        "errors": sorted({r.error for r in results if r.error})[:5],
    }


def _cpu_s() -> float:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def make_prompts(cfg: LoadConfig) -> list[list[int]]:
    rng = random.Random(cfg.seed)
    return [[rng.randrange(cfg.first_prompt_id, cfg.prompt_vocab) for _ in range(cfg.input_len)]
            for _ in range(cfg.num_prompts)]


def arrival_times(cfg: LoadConfig) -> list[float]:
    """Send times (s from the start): a Poisson process of rate ``request_rate``."""
    if math.isinf(cfg.request_rate):
        return [0.0] * cfg.num_prompts
    rng = random.Random(cfg.seed + 1)
    t, out = 0.0, []
    for _ in range(cfg.num_prompts):
        out.append(t)
        t += rng.expovariate(cfg.request_rate)
    return out


async def _one(client, cfg: LoadConfig, model: str, prompt: list[int], t0: float) -> RequestResult:
    body = {
        "model": model, "prompt": prompt, "max_tokens": cfg.output_len, "temperature": 0.0,
        "stream": True, "stream_options": {"include_usage": True},
    }
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    sent = time.perf_counter()
    res = RequestResult(ok=False, status=0, sent_s=sent - t0, prompt_tokens=len(prompt))
    last = None
    chunks = 0
    try:
        async with client.stream("POST", f"{cfg.api_root}/completions", json=body) as resp:
            res.status = resp.status_code
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                res.error = f"HTTP {resp.status_code}: {text[:200]}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                msg = json.loads(data)
                if msg.get("usage"):
                    res.output_tokens = msg["usage"].get("completion_tokens", res.output_tokens)
                    res.prompt_tokens = msg["usage"].get("prompt_tokens", res.prompt_tokens)
                choices = msg.get("choices") or []
                if not choices:
                    continue  # the usage chunk
                # Every chunk with a choice is a token (vLLM's rule), even when its text is
                # empty (held back for a stop string or a split UTF-8 character) -- except a
                # closing chunk that only carries the finish reason.
                c = choices[0]
                has_ids = bool((msg.get("moelab") or {}).get("token_ids"))
                if c.get("finish_reason") and not (c.get("text") or has_ids):
                    continue
                now = time.perf_counter()
                chunks += 1
                if last is None:
                    res.ttft_s = now - sent
                else:
                    res.itl_s.append(now - last)
                last = now
        res.e2e_s = time.perf_counter() - sent
        res.output_tokens = res.output_tokens or chunks
        res.ok = True
    except Exception as e:  # a failed request is a result, not a crash of the benchmark
        res.error = f"{type(e).__name__}: {e}"
    return res


async def run_load(cfg: LoadConfig) -> LoadReport:
    """Run the benchmark against ``cfg.base_url``; never raises for a failing request."""
    import httpx

    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=cfg.max_concurrency or cfg.num_prompts)
    async with httpx.AsyncClient(headers=headers, timeout=cfg.timeout_s, limits=limits) as client:
        model = cfg.model
        if model is None:
            try:
                r = await client.get(f"{cfg.api_root}/models")
                r.raise_for_status()
                model = r.json()["data"][0]["id"]
            except Exception as e:
                raise ConfigError(f"--base-url {cfg.base_url}: cannot list models ({type(e).__name__}: {e})") from None
        prompts, arrivals = make_prompts(cfg), arrival_times(cfg)
        sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
        t0 = time.perf_counter()
        cpu0 = _cpu_s()

        async def launch(prompt, at):
            delay = at - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            if cfg.max_duration_s is not None and time.perf_counter() - t0 > cfg.max_duration_s:
                return RequestResult(ok=False, status=0, sent_s=at, error="not sent: --max-duration reached")
            if sem is None:
                return await _one(client, cfg, model, prompt, t0)
            async with sem:
                return await _one(client, cfg, model, prompt, t0)

        results = await asyncio.gather(*(launch(p, a) for p, a in zip(prompts, arrivals, strict=True)))
        duration = time.perf_counter() - t0
        cpu = _cpu_s() - cpu0
    config = {k: v for k, v in asdict(cfg).items() if k != "api_key"}
    config["model"] = model
    return LoadReport(config, summarize(list(results), duration, cpu), list(results))
