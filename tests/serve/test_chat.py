"""Chat prompts: the checkpoint's template rendered as transformers renders it, the plain
fallback, and the chat endpoint using the template it was given."""

from __future__ import annotations

import json

import httpx
import pytest

from moelab.data.tokenizer import end_token_ids
from moelab.serve.chat import PLAIN_STOP, load_chat_template, plain_template

from .conftest import MAX_LEN, MODEL_NAME, make_engine, start_server

CHATML = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hi"}, {"role": "user", "content": "bye"}]


def test_plain_fallback_without_a_template(tmp_path):
    tpl = load_chat_template(tmp_path / "tokenizer.json")
    assert tpl.is_plain and load_chat_template(None).is_plain
    assert tpl.render(MESSAGES) == "system: Be brief.\nuser: hello\nassistant: hi\nuser: bye\nassistant:"
    assert PLAIN_STOP == ("\nuser:",)


@pytest.mark.parametrize("where", ["tokenizer_config", "named_list", "jinja_file"])
def test_template_beside_the_tokenizer(tmp_path, where):
    cfg = {"bos_token": {"content": "<s>"}, "eos_token": "<|im_end|>"}
    if where == "tokenizer_config":
        cfg["chat_template"] = CHATML
    elif where == "named_list":
        cfg["chat_template"] = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": CHATML}]
    else:
        (tmp_path / "chat_template.jinja").write_text(CHATML)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tpl = load_chat_template(tmp_path / "tokenizer.json")
    assert not tpl.is_plain
    assert tpl.render(MESSAGES[:2]) == (
        "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n")


def test_renders_like_transformers(tmp_path, tokenizer):
    transformers = pytest.importorskip("transformers")
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    template = ("{% for m in messages %}{% if m['role'] == 'system' %}[SYS]{{ m['content'] | trim }}\n"
                "{% else %}{{ m['role'] | upper }} {{ m['content'] | tojson }}{{ eos_token }}\n{% endif %}"
                "{% endfor %}{% if add_generation_prompt %}ASSISTANT{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "chat_template": template}))
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), eos_token="<|endoftext|>")
    want = hf.apply_chat_template(MESSAGES, chat_template=template, tokenize=False, add_generation_prompt=True)
    assert load_chat_template(tmp_path / "tokenizer.json").render(MESSAGES) == want


def test_raise_exception_in_a_template_is_a_400(tmp_path, model, tokenizer):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be the user') }}{% endif %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}")}))
    tpl = load_chat_template(tmp_path / "tokenizer.json")
    run = start_server(make_engine(model, tokenizer, max_num_seqs=1, max_len=MAX_LEN), tokenizer, chat_template=tpl)
    try:
        url = f"{run.url}/v1/chat/completions"
        r = httpx.post(url, json={"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 2}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        assert "first message must be the user" in r.json()["error"]["message"]
        ok = httpx.post(url, json={"model": MODEL_NAME, "messages": MESSAGES[1:2], "max_tokens": 2}, timeout=30)
        assert ok.status_code == 200
        assert ok.json()["usage"]["prompt_tokens"] == len(tokenizer.encode("hello", add_special_tokens=False).ids)
    finally:
        run.stop()


def test_chat_default_max_tokens_fills_the_context(server, tokenizer):
    def n_prompt(messages):
        return len(tokenizer.encode(plain_template().render(messages), add_special_tokens=False).ids)

    words = 1
    while n_prompt([{"role": "user", "content": "hello " * words}]) < MAX_LEN - 8:  # leave a few tokens
        words += 1
    messages = [{"role": "user", "content": "hello " * words}]
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"model": MODEL_NAME, "messages": messages,
                                                               "temperature": 0}, timeout=60).json()
    assert r["usage"]["prompt_tokens"] == n_prompt(messages)
    if r["choices"][0]["finish_reason"] == "length":
        assert r["usage"]["completion_tokens"] == MAX_LEN - n_prompt(messages)


def test_end_tokens(tokenizer):
    assert end_token_ids(tokenizer) == (tokenizer.token_to_id("<|endoftext|>"),)
