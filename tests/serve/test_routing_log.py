"""The served traffic's routing log, and `moelab analyze --traffic` reading it."""

from __future__ import annotations

import json

import openai
import pytest

from moelab.cli.main import main
from moelab.errors import ConfigError
from moelab.infer.generate import generate
from moelab.lab.traffic import analyze_traffic
from moelab.serve.routing_log import RoutingLog

from .conftest import MAX_LEN, MODEL_NAME, make_engine, start_server


def test_every_request_is_logged_with_its_routing_and_analyze_reads_it(model, tokenizer, tmp_path):
    path = tmp_path / "routing.jsonl"
    log = RoutingLog(path, num_experts=model.cfg.moe.num_experts, model=MODEL_NAME)
    run = start_server(make_engine(model, tokenizer, max_num_seqs=2, max_len=MAX_LEN), tokenizer)
    run.app.state.moelab.routing_log = log
    try:
        with openai.OpenAI(base_url=f"{run.url}/v1", api_key="x", max_retries=0, timeout=30) as c:
            whole = c.completions.create(model=MODEL_NAME, prompt=[5, 6, 7, 8], max_tokens=6, temperature=0,
                                         extra_body={"ignore_eos": True})
            chunks = list(c.completions.create(model=MODEL_NAME, prompt=[9, 10], max_tokens=5, temperature=0,
                                               stream=True, extra_body={"ignore_eos": True}))
    finally:
        run.stop()
    # The client did not ask for routing: it gets none, the log gets all of it.
    assert "routing" not in whole.model_extra["moelab"]
    assert all("routing" not in (ch.model_extra.get("moelab") or {}) for ch in chunks)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [len(x["token_ids"]) for x in lines] == [6, 5] and [len(x["routing"]) for x in lines] == [6, 5]
    ref = generate(model, [[5, 6, 7, 8]], max_new_tokens=6, record_routing=True)
    assert lines[0]["token_ids"] == ref.token_ids[0]
    assert [{k: v["experts"] for k, v in r.items()} for r in lines[0]["routing"]] == [
        {str(k): v for k, v in r.experts.items()} for r in ref.routing[0]]

    result = analyze_traffic(path)
    assert result.requests == 2 and result.tokens == 11 and result.num_experts == model.cfg.moe.num_experts
    for layer in result.layers:
        assert layer.tokens == 11 and sum(layer.load_share) == pytest.approx(1.0)
        assert layer.pairs == 5 + 4  # consecutive generated tokens within each request
    out = tmp_path / "analysis"
    assert main(["analyze", "--traffic", str(path), "--out", str(out)]) == 0
    assert json.loads((out / "traffic.json").read_text())["tokens"] == 11 and (out / "traffic_load.png").is_file()


def test_routing_log_refuses_to_overwrite(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text("keep me\n")
    with pytest.raises(ConfigError, match="--overwrite"):
        RoutingLog(path, num_experts=4, model="m")
    assert path.read_text() == "keep me\n"
    with pytest.raises(ConfigError, match="does not exist"):
        RoutingLog(tmp_path / "no" / "r.jsonl", num_experts=4, model="m")
