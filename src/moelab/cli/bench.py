"""`moelab bench serve`: load-test an OpenAI-compatible server (moelab's, llama.cpp's, vLLM's)."""

from __future__ import annotations

import argparse
import asyncio
import math
from pathlib import Path

from moelab.errors import ConfigError


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of requests per second or 'inf', got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (or inf), got {text!r}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="benchmarks that need a running server (bench serve)")
    sub = p.add_subparsers(dest="bench_command", required=True, metavar="WHAT")
    s = sub.add_parser(
        "serve",
        help="load-test an OpenAI-compatible server: TTFT, TPOT, ITL, E2E, tok/s",
        description="Streaming /v1/completions requests with Poisson arrivals; metrics as vLLM's bench serve "
        "defines them. Prompts are random token ids (exactly --input-len tokens) and ignore_eos makes each "
        "request produce exactly --output-len tokens.",
    )
    s.add_argument("--base-url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    s.add_argument("--num-prompts", type=int, default=32, help="requests to send (default 32)")
    s.add_argument("--request-rate", type=_rate, default=math.inf,
                   help="requests per second, Poisson arrivals; inf (default) sends all at once")
    s.add_argument("--max-concurrency", type=int, help="requests in flight at most (default: unbounded)")
    s.add_argument("--input-len", type=int, default=32, help="prompt tokens per request (default 32)")
    s.add_argument("--output-len", type=int, default=32, help="tokens generated per request (default 32)")
    s.add_argument("--seed", type=int, default=0, help="prompts and arrival times (default 0)")
    s.add_argument("--model", help="model name to request (default: the server's first in /v1/models)")
    s.add_argument("--api-key", help="sent as Authorization: Bearer KEY")
    s.add_argument("--prompt-vocab", type=int, default=1000, help="prompt ids are drawn from [2, N) (default 1000)")
    s.add_argument("--no-ignore-eos", action="store_true", help="let requests stop at end of text")
    s.add_argument("--max-duration", type=float, help="stop sending new requests after this many seconds")
    s.add_argument("--json", metavar="OUT", help="write the report (summary and per-request results) here")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moelab.io import atomic_write_json
    from moelab.serve.loadgen import LoadConfig, run_load

    out = Path(args.json) if args.json else None
    if out is not None and out.exists() and not args.overwrite:
        raise ConfigError(f"--json {out}: exists; pass --overwrite to replace it")
    cfg = LoadConfig(
        base_url=args.base_url, num_prompts=args.num_prompts, request_rate=args.request_rate,
        max_concurrency=args.max_concurrency, input_len=args.input_len, output_len=args.output_len,
        seed=args.seed, model=args.model, api_key=args.api_key, prompt_vocab=args.prompt_vocab,
        ignore_eos=not args.no_ignore_eos, max_duration_s=args.max_duration,
    )
    report = asyncio.run(run_load(cfg))
    s = report.summary
    if out is not None:
        data = report.to_dict()
        data["config"]["request_rate"] = str(cfg.request_rate)  # JSON has no inf
        atomic_write_json(out, data)
    print(f"completed {s['completed']} / {cfg.num_prompts} (failed {s['failed']}, 429: {s['rejected_429']}) "
          f"in {s['duration_s']:.2f} s")
    if s["completed"]:
        print(f"output {s['output_tok_per_s']:.1f} tok/s, {s['req_per_s']:.2f} req/s; client CPU "
              f"{100 * s['client_cpu_share']:.0f}% of one core")
        for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            m = s[name]
            if m["p50"] is not None:
                print(f"{name[:-3].upper():>5} ms  mean {m['mean']:.1f}  p50 {m['p50']:.1f}  p90 {m['p90']:.1f}  "
                      f"p99 {m['p99']:.1f}")
    for e in s["errors"]:
        print(f"error: {e}")
    if out is not None:
        print(f"wrote {out}")
    return 0 if s["completed"] else 1
