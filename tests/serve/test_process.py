"""`moelab serve` as users run it: a separate process, loaded by `moelab bench serve`, then
stopped with SIGTERM while a stream is running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from .conftest import free_port

httpx = pytest.importorskip("httpx")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def folder(tokenizer, tmp_path_factory):
    """The tiny random Mixtral with its tokenizer, as a Hugging Face folder on disk."""
    import torch
    import transformers

    cfg = transformers.MixtralConfig(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=None,
        eos_token_id=None, pad_token_id=None, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("served")
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tokenizer.save(str(out / "tokenizer.json"))
    return out


def start(folder, *args, new_session: bool = False):
    """`moelab serve FOLDER ARGS` on a free port, once /health answers; ``new_session``: in a
    process group of its own (so a test can Ctrl-C the group as a terminal would)."""
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "moelab.cli.main", "serve", str(folder), "--port", str(port),
                             "--threads", "1", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=new_session)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, f"moelab serve exited: {proc.stdout.read()}"
        assert time.monotonic() < deadline, "moelab serve did not become healthy"
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)


def test_bench_serve_against_a_real_server_then_sigterm_drains(folder, tmp_path):
    proc, url = start(folder, "--max-num-seqs", "4", "--drain-timeout", "20")
    try:
        out = tmp_path / "bench.json"
        bench = subprocess.run(
            [sys.executable, "-m", "moelab.cli.main", "bench", "serve", "--base-url", url, "--num-prompts", "6",
             "--max-concurrency", "3", "--input-len", "5", "--output-len", "8", "--prompt-vocab", "100",
             "--json", str(out)], capture_output=True, text=True, timeout=120)
        assert bench.returncode == 0, bench.stdout + bench.stderr
        report = json.loads(out.read_text())
        s = report["summary"]
        assert s["completed"] == 6 and s["failed"] == 0
        assert s["output_tokens"] == 6 * 8  # ignore_eos: exactly --output-len each
        assert all(r["output_tokens"] == 8 and len(r["itl_s"]) == 7 for r in report["requests"])
        assert s["ttft_ms"]["p50"] > 0 and s["itl_ms"]["p99"] >= s["itl_ms"]["p50"]
        # The refusal of an existing report without --overwrite.
        again = subprocess.run([sys.executable, "-m", "moelab.cli.main", "bench", "serve", "--base-url", url,
                                "--json", str(out)], capture_output=True, text=True, timeout=60)
        assert again.returncode == 2 and "--overwrite" in again.stderr

        # A long stream is running when SIGTERM arrives: it still ends properly, new work is refused.
        body = {"model": str(folder), "prompt": [5, 6, 7], "max_tokens": 200, "stream": True, "ignore_eos": True}
        with httpx.Client(timeout=60) as client, client.stream("POST", f"{url}/v1/completions", json=body) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
            assert json.loads(first[5:])["choices"][0]["finish_reason"] is None
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)  # uvicorn looks at its exit flag every 0.1 s
            # New work is refused: 503 while draining, or no listener once it is done (the
            # tiny model may finish the stream first). The 503 itself is tested in test_app.
            try:
                refused = httpx.post(f"{url}/v1/completions", json={**body, "stream": False}, timeout=10)
                assert refused.status_code == 503
            except httpx.ConnectError:
                pass
            rest = [line[5:].strip() for line in lines if line.startswith("data:")]
        assert rest[-1] == "[DONE]"
        reasons = [json.loads(x)["choices"][0]["finish_reason"] for x in rest[:-1] if json.loads(x)["choices"]]
        assert reasons[-1] in ("length", "shutdown")
        # uvicorn re-raises the signal once it has shut down, so the exit is "killed by SIGTERM"
        # (what a supervisor expects), after the drain above.
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        assert "draining" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
