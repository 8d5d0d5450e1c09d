"""The OpenAI wire format through a real server, driven by the official `openai` client,
and every bad request answered in OpenAI's error shape naming the field."""

from __future__ import annotations

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import KEY, MAX_LEN, MODEL_NAME, make_engine, start_server


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30) as c:
        yield c


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME


def test_completion(client):
    r = client.completions.create(model=MODEL_NAME, prompt="The quick brown fox", max_tokens=5, temperature=0)
    assert r.object == "text_completion" and len(r.choices) == 1
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens == len(r.model_extra["moelab"]["token_ids"]) <= 5
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_default_max_tokens_is_16(client):
    r = client.completions.create(model=MODEL_NAME, prompt=[5, 6, 7], temperature=0, stop=None)
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == 16
    assert r.usage.prompt_tokens == 3


def test_chat(client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hello"}],
                                       max_tokens=6, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant" and isinstance(r.choices[0].message.content, str)
    assert r.usage.completion_tokens <= 6


def test_stream_completion_matches_whole(client):
    kw = dict(model=MODEL_NAME, prompt="Mixture of experts", max_tokens=8, temperature=0)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].text for c in chunks[:-1]) == whole.choices[0].text
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    ids = [t for c in chunks[:-1] for t in (c.model_extra.get("moelab") or {}).get("token_ids", [])]
    assert ids == whole.model_extra["moelab"]["token_ids"]


def test_stream_chat(client):
    kw = dict(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_return_routing(client, model):
    r = client.completions.create(model=MODEL_NAME, prompt=[1, 2, 3], max_tokens=4, temperature=0,
                                  extra_body={"return_routing": True})
    ext = r.model_extra["moelab"]
    assert len(ext["routing"]) == len(ext["token_ids"])
    k = model.cfg.moe.top_k
    for per_token in ext["routing"]:
        assert len(per_token) == model.cfg.n_layers
        for layer in per_token.values():
            assert len(layer["experts"]) == k and len(layer["weights"]) == k
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=[1, 2, 3], max_tokens=4, temperature=0,
                                            stream=True, extra_body={"return_routing": True}))
    streamed = [t for c in chunks for t in (c.model_extra.get("moelab") or {}).get("routing", [])]
    assert streamed == ext["routing"]


def test_stop_string_cuts_the_text(client):
    free = client.completions.create(model=MODEL_NAME, prompt=[9, 8, 7], max_tokens=12, temperature=0)
    text = free.choices[0].text
    if len(text) < 4:
        pytest.skip("the random model wrote too little text to pick a stop string from")
    stop = text[2:4]
    r = client.completions.create(model=MODEL_NAME, prompt=[9, 8, 7], max_tokens=12, temperature=0, stop=stop)
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == text[: text.find(stop)]


def test_ignore_eos_runs_to_max_tokens(client, model, tokenizer):
    from moelab.data.tokenizer import end_token_ids
    from moelab.infer.generate import generate

    stop = end_token_ids(tokenizer)
    prompts = [[s] for s in range(2, 60)]
    reasons = generate(model, prompts, max_new_tokens=30, temperature=0, stop_token_ids=stop).finish_reasons
    early = next((p for p, why in zip(prompts, reasons, strict=True) if why == "stop_token"), None)
    if early is None:
        pytest.skip("the random model writes no end token from these prompts")
    r = client.completions.create(model=MODEL_NAME, prompt=early, max_tokens=30, temperature=0)
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens < 30
    r = client.completions.create(model=MODEL_NAME, prompt=early, max_tokens=30, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 30


# ---- bad requests ---------------------------------------------------------------------

GOOD = {"model": MODEL_NAME, "prompt": "hello", "max_tokens": 2}
CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}


def _post(server, path, body, **kw):
    return httpx.post(f"{server.url}{path}", timeout=30, **({"content": body} if isinstance(body, str | bytes)
                                                            else {"json": body}), **kw)


@pytest.mark.parametrize("path,body,status,param", [
    ("/v1/completions", "{not json", 400, None),
    ("/v1/completions", "[1, 2]", 400, None),
    ("/v1/completions", {**GOOD, "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {"prompt": "hello"}, 400, "model"),
    ("/v1/completions", {"model": MODEL_NAME}, 400, "prompt"),
    ("/v1/completions", {**GOOD, "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {**GOOD, "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {**GOOD, "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {**GOOD, "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {**GOOD, "temperature": -0.5}, 400, "temperature"),
    ("/v1/completions", {**GOOD, "top_k": 0}, 400, "top_k"),
    ("/v1/completions", {**GOOD, "n": 2}, 400, "n"),
    ("/v1/completions", {**GOOD, "echo": True}, 400, "echo"),
    ("/v1/completions", {**GOOD, "logprobs": 2}, 400, "logprobs"),
    ("/v1/completions", {**GOOD, "stop": [""]}, 400, "stop"),
    ("/v1/completions", {**GOOD, "prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {**GOOD, "prompt": [1, 10**6]}, 400, "prompt"),
    ("/v1/completions", {**GOOD, "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {**GOOD, "prompt": [1] * MAX_LEN}, 400, "prompt"),
    ("/v1/completions", {**GOOD, "prompt": [1] * (MAX_LEN - 4), "max_tokens": 10}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": MODEL_NAME}, 400, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"content": "x"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "word " * MAX_LEN}]}, 400, "messages"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": -3}, 400, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "logprobs": True}, 400, "logprobs"),
    ("/v1/chat/completions", {**CHAT, "model": "nope"}, 404, "model"),
])
def test_bad_request_names_the_field(server, path, body, status, param):
    r = _post(server, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and err["message"]


def test_openai_client_raises_on_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_NAME, prompt="x", top_p=2.0)
    assert e.value.body["param"] == "top_p"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x")


def test_unknown_route_is_an_openai_error(server):
    r = httpx.get(f"{server.url}/v1/nothing", timeout=10)
    assert r.status_code == 404 and "error" in r.json()


def test_health(server):
    r = httpx.get(f"{server.url}/health", timeout=10)
    assert r.status_code == 200 and r.json() == {"status": "ok"}


# ---- metrics --------------------------------------------------------------------------


def _metrics(server, **kw) -> dict:
    text = httpx.get(f"{server.url}/metrics", timeout=10, **kw).text
    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(families, name, **labels) -> float:
    family = name.removesuffix("_total").removesuffix("_count")
    return sum(s.value for s in families[family].samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_metrics_counters_grow_and_show_expert_load(server, client, model):
    before = _metrics(server)
    client.completions.create(model=MODEL_NAME, prompt=[4, 5, 6, 7], max_tokens=5, temperature=0)
    after = _metrics(server)
    assert _value(after, "moelab_serve_prompt_tokens_total") >= _value(before, "moelab_serve_prompt_tokens_total") + 4
    assert _value(after, "moelab_serve_generation_tokens_total") > _value(before, "moelab_serve_generation_tokens_total")
    assert _value(after, "moelab_serve_requests_finished_total") > _value(before, "moelab_serve_requests_finished_total")
    assert _value(after, "moelab_serve_time_to_first_token_seconds_count") >= 1
    assert _value(after, "moelab_serve_e2e_request_latency_seconds_count") >= 1
    assert "moelab_serve_requests_running" in after and "moelab_serve_requests_waiting" in after
    E, n_layers = model.cfg.moe.num_experts, model.cfg.n_layers
    experts = [s for s in after["moelab_serve_expert_tokens"].samples if s.name == "moelab_serve_expert_tokens_total"]
    assert {(s.labels["layer"], s.labels["expert"]) for s in experts} == {
        (str(layer), str(e)) for layer in range(n_layers) for e in range(E)}
    assert sum(s.value for s in experts) > 0
    shares = after["moelab_serve_expert_busiest_share"].samples
    assert len(shares) == n_layers and all(1 / E <= s.value <= 1 for s in shares)


# ---- auth -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed(model, tokenizer):
    run = start_server(make_engine(model, tokenizer, max_num_seqs=2, max_len=MAX_LEN), tokenizer, api_key=KEY)
    yield run
    run.stop()


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
@pytest.mark.parametrize("method,path", [("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/completions")])
def test_api_key_required(keyed, headers, method, path):
    r = httpx.request(method, f"{keyed.url}{path}", headers=headers, json=GOOD, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_api_key_accepted_and_health_is_open(keyed):
    assert httpx.get(f"{keyed.url}/health", timeout=10).status_code == 200
    with openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=KEY, max_retries=0, timeout=30) as c:
        assert c.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=2).usage.completion_tokens <= 2
    with openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="bad", max_retries=0, timeout=30) as c:
        with pytest.raises(openai.AuthenticationError):
            c.models.list()
