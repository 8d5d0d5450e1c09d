"""Benchmark: serving throughput and latency, continuous batching vs one request at a time.

    python -m benchmarks.serve --json runs/bench/serve.json [--quick] [--http] [--threads N]

The model is the decode benchmark's ~213M Mixtral-shaped one (random weights built by
transformers, imported into moelab, so every contender runs the same weights) with a
byte-level BPE tokenizer of the same vocabulary trained here on Python's own sources.
Every request has a prompt of ``--input-len`` random token ids and produces exactly
``--output-len`` tokens (greedy, no stop token), so contenders do the same work.

Engine section (in process, no HTTP): ``N`` requests are submitted at once to a
`moelab.serve.Engine` with ``max_num_seqs = c`` (the engine's own queue then keeps ``c``
in flight, like a client with ``--max-concurrency c``), for c in 1 / 4 / 16. One at a
time is ``max_num_seqs = 1``; transformers' `generate` serving the same requests one by
one is the outside reference. Output tok/s = all generated tokens / wall time; ITL =
gaps between a request's successive tokens as the engine hands them out; the batch-1
decode step is the median ITL at c = 1.

HTTP section (``--http``): `moelab serve` in a subprocess, driven by `moelab bench serve`'s
load generator (`moelab.serve.loadgen`) in this process at concurrency 1 / 4 / 16 and a
Poisson rate sweep; the server with ``--max-num-seqs 1`` is one-at-a-time serving.
llama.cpp's server runs on the same weights exported to GGUF when `llama_cpp.server` and
moelab's GGUF export are both available; otherwise its row says why.

EP section (``--ep``): the same load at concurrency 4 against `moelab serve` in one process
(1 thread, and ``--threads`` threads) and `moelab serve --nproc 2 --ep 2` (one thread per rank, the
experts split over the two ranks, docs/serve.md), alternating ``--repeats`` times, driven
from this process; the rows also say whether both servers returned the same tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import machine_info, set_threads
from moelab.io import atomic_write_json

log = logging.getLogger("benchmarks.serve")


def add_build_args(ap, max_len: int = 512) -> None:
    """The flags of `build`'s model, defaulting to the decode benchmarks' ~207M Mixtral."""
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--tokenizer-chars", type=int, default=5_000_000)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--d-expert", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=max_len)


def quick_build_args(args) -> None:
    """`build`'s small model for ``--quick`` smoke runs."""
    args.vocab, args.tokenizer_chars, args.d_model, args.d_expert, args.layers = 2048, 300_000, 256, 512, 2


def build(folder: Path, args) -> tuple[object, object]:
    """A random transformers Mixtral saved with a trained tokenizer; (hf model, ours)."""
    from transformers import AutoModelForCausalLM, MixtralConfig

    from moelab.data.stdlib_sources import code_texts
    from moelab.data.tokenizer import save_tokenizer, train_tokenizer
    from moelab.hf import from_pretrained

    tok = train_tokenizer([t for t, _ in code_texts()], vocab_size=args.vocab, max_train_chars=args.tokenizer_chars)
    vocab = tok.get_vocab_size()
    cfg = MixtralConfig(
        vocab_size=vocab, hidden_size=args.d_model, intermediate_size=args.d_expert, num_hidden_layers=args.layers,
        num_attention_heads=args.d_model // 64, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=args.max_len, bos_token_id=None, eos_token_id=0, pad_token_id=1,
    )
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg).eval()
    hf.save_pretrained(folder)
    save_tokenizer(tok, folder / "tokenizer.json")
    return hf, from_pretrained(folder)


def make_requests(n: int, input_len: int, output_len: int, vocab: int, seed: int):
    from moelab.serve.types import GenerationRequest

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (n, input_len), generator=g).tolist()
    return [GenerationRequest(prompt_ids=tuple(p), max_tokens=output_len) for p in ids]


def run_engine(model, requests, slots: int, budget: int) -> dict:
    """All requests at once into an engine of `slots` slots; throughput and token gaps."""
    from moelab.serve.engine import Engine, EngineConfig

    engine = Engine(model, EngineConfig(max_num_seqs=slots, max_batch_tokens=budget, max_queue=len(requests)))
    times: dict[str, list[float]] = {r.request_id: [] for r in requests}
    token_lists: dict[str, list[int]] = {r.request_id: [] for r in requests}

    def sink(rid):
        def on_event(e):
            if e.token_ids:
                times[rid].append(time.perf_counter())
                token_lists[rid].extend(e.token_ids)
        return on_event

    t0 = time.perf_counter()
    for r in requests:
        engine.submit(r, sink(r.request_id))
    while engine.step():
        pass
    wall = time.perf_counter() - t0
    gaps = [b - a for ts in times.values() for a, b in zip(ts, ts[1:], strict=False)]
    out_tokens = sum(len(t) for t in token_lists.values())
    s = engine.stats()
    return {
        "slots": slots, "requests": len(requests), "wall_s": wall, "output_tokens": out_tokens,
        "output_tok_s": out_tokens / wall, "itl_ms": _pct(gaps), "mean_decode_batch": s.decode_rows / max(s.decode_steps, 1),
        "tokens": [token_lists[r.request_id] for r in requests],
    }


def run_hf_sequential(hf, requests) -> dict:
    t0 = time.perf_counter()
    outs = []
    with torch.inference_mode():
        for r in requests:
            ids = torch.tensor([r.prompt_ids])
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=r.max_tokens,
                              min_new_tokens=r.max_tokens, do_sample=False, pad_token_id=1)
            outs.append(out[0, ids.shape[1]:].tolist())
    wall = time.perf_counter() - t0
    n = sum(map(len, outs))
    return {"requests": len(requests), "wall_s": wall, "output_tokens": n, "output_tok_s": n / wall, "tokens": outs}


def _pct(xs: list[float]) -> dict:
    from moelab.serve.loadgen import percentiles

    return {k: (None if v is None else v * 1e3) for k, v in percentiles(xs).items()}


# ---------------------------------------------------------------------------- HTTP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_process(cmd: list[str], port: int, health: str = "/health"):
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_healthy(port, proc, path=health)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def moelab_server(folder: Path, slots: int, budget: int, threads: int, *extra: str):
    port = _free_port()
    cmd = [sys.executable, "-m", "moelab.cli.main", "serve", str(folder), "--port", str(port),
           "--max-num-seqs", str(slots), "--max-batch-tokens", str(budget), "--max-queue", "1024",
           "--threads", str(threads), *extra]
    return server_process(cmd, port)


def llama_server_binary() -> str | None:
    """llama.cpp's own `llama-server` ($LLAMA_SERVER, or on PATH): parallel slots with
    continuous batching, unlike llama-cpp-python's server, which runs one request at a time."""
    import shutil

    path = os.environ.get("LLAMA_SERVER") or shutil.which("llama-server")
    return path if path and Path(path).is_file() else None


def _wait_healthy(port: int, proc: subprocess.Popen, path: str = "/health", timeout_s: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}{path}", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"server on port {port} not healthy after {timeout_s} s")


def run_http(base_url: str, args, concurrency: int | None, rate: float, n: int, vocab: int) -> dict:
    from moelab.serve.loadgen import LoadConfig, run_load

    cfg = LoadConfig(base_url=base_url, num_prompts=n, request_rate=rate, max_concurrency=concurrency,
                     input_len=args.input_len, output_len=args.output_len, seed=0, prompt_vocab=vocab)
    rep = asyncio.run(run_load(cfg))
    return {"concurrency": concurrency, "request_rate": str(rate), **rep.summary}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default="runs/bench/serve.json")
    p.add_argument("--threads", type=int)
    p.add_argument("--quick", action="store_true", help="a small model and few requests (a smoke run)")
    p.add_argument("--http", action="store_true", help="also the HTTP section (moelab serve, llama.cpp)")
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--budget", type=int, default=512, help="--max-batch-tokens of the engine")
    p.add_argument("--repeats", type=int, default=3, help="engine section: alternating repeats (medians)")
    p.add_argument("--rates", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0], help="HTTP: Poisson rates (req/s)")
    p.add_argument("--rate-prompts", type=int, default=24, help="HTTP: requests per rate")
    p.add_argument("--skip-engine", action="store_true", help="only the HTTP section")
    p.add_argument("--ep", action="store_true", help="also the EP section (serve over 2 ranks vs 1 process)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    threads = set_threads(args.threads)
    if args.quick:
        args.vocab, args.d_model, args.d_expert, args.layers, args.max_len = 2048, 256, 512, 2, 1024
        args.tokenizer_chars = 500_000
        args.output_len = min(args.output_len, 16)
    else:
        args.vocab, args.d_model, args.d_expert, args.layers, args.max_len = 32000, 768, 1024, 8, 4096
        args.tokenizer_chars = 5_000_000
    result: dict = {"machine": machine_info(), "threads": threads, "args": vars(args)}
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "model"
        t0 = time.perf_counter()
        hf, ours = build(folder, args)
        vocab = ours.cfg.vocab_size
        result["model"] = {"params": ours.num_params(), "vocab": vocab, "build_s": time.perf_counter() - t0}
        log.info("model: %.1fM parameters, vocab %d", ours.num_params() / 1e6, vocab)

        # ---- engine, in process: one at a time and batched alternate, medians of the repeats
        engine_rows = []
        for c in (() if args.skip_engine else (1, 4, 16)):
            n = 4 if args.quick else max(2 * c, 4)
            reqs = make_requests(n, args.input_len, args.output_len, vocab, seed=c)
            runs: dict[str, list[dict]] = {"one": [], "batched": []}
            for _ in range(args.repeats):
                runs["one"].append(run_engine(ours, reqs, 1, args.budget))
                if c > 1:
                    runs["batched"].append(run_engine(ours, reqs, c, args.budget))
            if c == 1:
                runs["batched"] = runs["one"]
            hf_row = run_hf_sequential(hf, reqs[: min(len(reqs), 4)])
            one = statistics.median(r["output_tok_s"] for r in runs["one"])
            batched = statistics.median(r["output_tok_s"] for r in runs["batched"])
            best = min(runs["batched"], key=lambda r: abs(r["output_tok_s"] - batched))  # the median run
            base = min(runs["one"], key=lambda r: abs(r["output_tok_s"] - one))
            row = {
                "concurrency": c, "requests": n, "repeats": args.repeats,
                "one_at_a_time_tok_s": one, "batched_tok_s": batched,
                "all_one_at_a_time_tok_s": [r["output_tok_s"] for r in runs["one"]],
                "all_batched_tok_s": [r["output_tok_s"] for r in runs["batched"]],
                "speedup_vs_one_at_a_time": batched / one,
                "hf_one_at_a_time_tok_s": hf_row["output_tok_s"],
                "speedup_vs_hf": batched / hf_row["output_tok_s"],
                "itl_ms": best["itl_ms"], "one_at_a_time_itl_ms": base["itl_ms"],
                "mean_decode_batch": best["mean_decode_batch"],
                "same_tokens_batched_vs_alone": all(r["tokens"] == base["tokens"] for r in runs["batched"]),
                "same_tokens_as_hf": hf_row["tokens"] == base["tokens"][: len(hf_row["tokens"])],
            }
            engine_rows.append(row)
            log.info("c=%d: batched %.1f tok/s, one at a time %.1f (x%.2f), HF %.1f; ITL p50/p99 %.1f/%.1f ms; "
                     "same tokens %s / HF %s", c, row["batched_tok_s"], row["one_at_a_time_tok_s"],
                     row["speedup_vs_one_at_a_time"], row["hf_one_at_a_time_tok_s"], row["itl_ms"]["p50"],
                     row["itl_ms"]["p99"], row["same_tokens_batched_vs_alone"], row["same_tokens_as_hf"])
        step1 = engine_rows[0]["one_at_a_time_itl_ms"]["p50"] if engine_rows else None
        for row in engine_rows:
            row["itl_p99_over_batch1_step"] = row["itl_ms"]["p99"] / step1
        result["engine"] = engine_rows

        # ---- HTTP
        if args.http:
            result["http"] = http_section(folder, args, threads, vocab)
        if args.ep:
            result["ep"] = ep_section(folder, args, threads, vocab)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)
    log.info("wrote %s", out)
    if "http" in result:
        png = out.with_suffix(".png")
        plot_curve(result["http"]["rows"], png)
        log.info("wrote %s", png)


def plot_curve(rows: list[dict], path: Path) -> None:
    """Throughput vs latency: output tok/s against p50 / p99 end-to-end latency, one line
    per server setting, one point per concurrency or request rate."""
    from moelab.lab.plots import _figure, _save

    fig = _figure(9, 3.6)
    axes = fig.subplots(1, 2)
    series: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("output_tok_per_s"):
            kind = "rate" if r.get("concurrency") is None else "concurrency"
            series.setdefault(f"{r['server']} ({kind})", []).append(r)
    for ax, (key, label) in zip(axes, (("itl_ms", "p99 inter-token latency (ms)"), ("e2e_ms", "p50 end-to-end (ms)")),
                                strict=True):
        for name, pts in series.items():
            pts = sorted(pts, key=lambda r: r["output_tok_per_s"])
            q = "p99" if key == "itl_ms" else "p50"
            ax.plot([r["output_tok_per_s"] for r in pts], [r[key][q] for r in pts], marker="o", label=name)
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    _save(fig, path)


def http_section(folder: Path, args, threads: int, vocab: int) -> dict:
    rows: list[dict] = []
    n_for = {1: 4, 4: 12, 16: 32} if not args.quick else {1: 2, 4: 4, 16: 8}

    def sweep(server: str, url: str, concurrencies=(1, 4, 16)):
        run_http(url, args, 1, float("inf"), 2, vocab)  # warm-up
        for c in concurrencies:
            r = run_http(url, args, c, float("inf"), n_for[c], vocab)
            rows.append({"server": server, **r})
            log.info("%s c=%d: %.1f tok/s, ITL p50/p99 %.1f/%.1f ms, TTFT p50 %.0f ms, client CPU %.0f%%", server, c,
                     r["output_tok_per_s"] or 0, r["itl_ms"]["p50"] or 0, r["itl_ms"]["p99"] or 0,
                     r["ttft_ms"]["p50"] or 0, 100 * (r["client_cpu_share"] or 0))

    def rates(server: str, url: str):
        for rate in args.rates:
            r = run_http(url, args, None, rate, args.rate_prompts, vocab)
            rows.append({"server": server, **r})
            log.info("%s rate %.2f/s: %.1f tok/s, ITL p99 %.1f ms, E2E p50/p99 %.0f/%.0f ms", server, rate,
                     r["output_tok_per_s"] or 0, r["itl_ms"]["p99"] or 0, r["e2e_ms"]["p50"] or 0,
                     r["e2e_ms"]["p99"] or 0)

    with moelab_server(folder, 16, args.budget, threads) as url:
        sweep("moelab continuous, 16 slots", url)
        rates("moelab continuous, 16 slots", url)
    with moelab_server(folder, 16, args.budget, threads, "--batching", "dynamic", "--batch-window", "0.05") as url:
        sweep("moelab dynamic, 16 slots", url, (16,))
        rates("moelab dynamic, 16 slots", url)
    with moelab_server(folder, 1, args.budget, threads) as url:
        sweep("moelab one at a time (1 slot)", url)
    rows.extend(llama_cpp_rows(folder, args, threads, vocab, sweep))
    return {"rows": rows}


def ep_section(folder: Path, args, threads: int, vocab: int, concurrency: int = 4) -> dict:
    """One process vs the experts over 2 ranks, same requests, alternating (medians)."""
    from moelab.serve.loadgen import LoadConfig, run_load

    n = 4 if args.quick else 8
    servers = {f"moelab serve, 1 process x {t} thread{'s' if t > 1 else ''}": (t, ()) for t in sorted({1, threads})}
    servers["moelab serve --nproc 2 --ep 2, 1 thread per rank"] = (1, ("--nproc", "2", "--ep", "2"))
    runs: dict[str, list[dict]] = {name: [] for name in servers}
    tokens: dict[str, list] = {}
    for _ in range(args.repeats):
        for name, (t, extra) in servers.items():
            with moelab_server(folder, 16, args.budget, t, *extra) as url:
                run_http(url, args, 1, float("inf"), 1, vocab)  # warm-up
                cfg = LoadConfig(base_url=url, num_prompts=n, request_rate=float("inf"), max_concurrency=concurrency,
                                 input_len=args.input_len, output_len=args.output_len, seed=0, prompt_vocab=vocab)
                rep = asyncio.run(run_load(cfg))
                tokens.setdefault(name, greedy_probe(url, str(folder), vocab, args.output_len))
            runs[name].append(rep.summary)
            log.info("%s: %.1f tok/s, ITL p50 %.1f ms", name, rep.summary["output_tok_per_s"] or 0,
                     rep.summary["itl_ms"]["p50"] or 0)
    rows = []
    for name, rs in runs.items():
        tok_s = [r["output_tok_per_s"] for r in rs]
        med = statistics.median(tok_s)
        best = min(rs, key=lambda r: abs(r["output_tok_per_s"] - med))
        rows.append({"server": name, "concurrency": concurrency, "requests": n, "output_tok_s": med, "all_tok_s": tok_s,
                     "itl_ms": best["itl_ms"], "ttft_ms": best["ttft_ms"]})
    first, *others = tokens.values()
    ep2 = rows[-1]["output_tok_s"]
    return {"rows": rows, "same_greedy_tokens": all(t == first for t in others),
            "ep2_tok_s_over": {r["server"]: ep2 / r["output_tok_s"] for r in rows[:-1]}}


def greedy_probe(url: str, model: str, vocab: int, n: int) -> list[list[int]]:
    """Greedy token ids of two fixed prompts (to check the servers agree)."""
    import httpx

    out = []
    for prompt in ([5, 6, 7, 8], list(range(10, min(vocab, 40)))):
        body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
        r.raise_for_status()
        out.append(r.json()["moelab"]["token_ids"])
    return out


def llama_cpp_rows(folder: Path, args, threads: int, vocab: int, sweep) -> list[dict]:
    """llama.cpp's server on the same weights exported to GGUF (f32, like ours)."""
    binary = llama_server_binary()
    if binary is None:
        try:
            import llama_cpp.server.app  # noqa: F401
        except ImportError as e:
            return [{"server": "llama.cpp", "skipped": f"no llama-server binary and llama_cpp.server not importable: {e}"}]
    gguf = folder.parent / "model.gguf"
    proc = subprocess.run([sys.executable, "-m", "moelab.cli.main", "convert", str(folder), "--to-gguf", str(gguf),
                           "--type", "f32", "--overwrite"], capture_output=True, text=True)
    if proc.returncode != 0:
        return [{"server": "llama.cpp", "skipped": f"GGUF export failed: {proc.stderr.strip()[-300:]}"}]
    port = _free_port()
    if binary is not None:
        cmd = [binary, "-m", str(gguf), "--port", str(port), "-t", str(threads), "-tb", str(threads), "-np", "16",
               "-c", str(16 * (args.input_len + args.output_len + 16)), "--no-webui", "-a", "llama"]
        name = "llama.cpp llama-server f32, 16 slots"
    else:
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port),
               "--n_threads", str(threads), "--n_ctx", "4096", "--model_alias", "llama"]
        name = "llama-cpp-python server f32 (one request at a time)"
    with server_process(cmd, port, health="/v1/models") as url:
        sweep(name, url)
    return []


if __name__ == "__main__":
    main()
