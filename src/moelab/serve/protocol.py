"""The OpenAI wire format: request schemas, their validation, and response/chunk bodies.

Requests are parsed from raw JSON here (not by FastAPI) so that every bad request gets
OpenAI's error shape ``{"error": {"message", "type", "param", "code"}}`` naming the field,
with status 400 rather than FastAPI's 422 list. `parse_completion` and `parse_chat` return
pydantic models with OpenAI's defaults filled in; `sampling_fields` maps one onto the
keyword arguments of `GenerationRequest`.

Extensions (moelab, not OpenAI): ``top_k`` (int >= 1), ``return_routing`` (bool) and
``ignore_eos`` (bool, as vLLM has it: end-of-text tokens do not stop the request) in requests; a top-level ``"moelab"`` object in responses and chunks carrying the generated
``token_ids`` and, with ``return_routing``, per-token ``routing``.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

# OpenAI's finish reasons for the engine's (see `moelab.serve.types.FINISH_REASONS`).
# "shutdown" (the server stopped before the request finished) has no OpenAI equivalent;
# it is passed through as is, so a client can tell it from a normal end ("stop"/"length")
# and retry elsewhere. "abort" never reaches a client (it means the client went away).
OPENAI_FINISH_REASON = {"stop": "stop", "length": "length", "shutdown": "shutdown", "abort": "abort"}


class APIError(Exception):
    """An error answered in OpenAI's JSON shape with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        type: str = "invalid_request_error",
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(param: str | None, message: str, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by both endpoints, with OpenAI's defaults."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float | None = None  # None: OpenAI's default 1.0
    top_p: float | None = None  # None: 1.0
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # moelab extensions (ignore_eos as vLLM has it)
    top_k: int | None = None
    return_routing: bool | None = False
    ignore_eos: bool | None = False

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop strings, got {len(stops)}")
        return stops


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self, i: int) -> str:
        """The message's text: a string, or the concatenated ``{"type": "text"}`` parts."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"messages[{i}].content", f"messages[{i}].content: only text parts are supported, got {part.get('type')!r}")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list | None = None
    response_format: dict | None = None


def _loc(loc: tuple) -> str:
    """A pydantic error location as OpenAI writes a param: ``messages[0].role``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not out:
            out = str(part)
        elif part in ("str", "list[str]", "list[int]", "list[list[int]]", "int", "bool") or "[" in str(part):
            break  # a union-member tag, not a field
        else:
            out += f".{part}"
    return out


def _validate(model: type[BaseModel], body: bytes) -> Any:
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(None, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise bad_request(None, f"the request body must be a JSON object, got {type(obj).__name__}", code="invalid_json")
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        err = e.errors()[0]
        param = _loc(err["loc"])
        if err["type"] == "missing":
            raise bad_request(param, f"{param}: this field is required", code="missing_field") from None
        raise bad_request(param, f"{param}: {err['msg']}, got {err.get('input')!r}"[:500]) from None


def _check_sampling(r: _Sampling) -> None:
    """OpenAI's ranges, and the fields this server does not support (named, not ignored)."""
    if r.max_tokens is not None and r.max_tokens < 0:
        raise bad_request("max_tokens", f"max_tokens: must be >= 0, got {r.max_tokens}")
    if r.temperature is not None and not 0 <= r.temperature <= 2:
        raise bad_request("temperature", f"temperature: must be in [0, 2], got {r.temperature}")
    if r.top_p is not None and not 0 < r.top_p <= 1:
        raise bad_request("top_p", f"top_p: must be in (0, 1], got {r.top_p}")
    if r.top_k is not None and r.top_k < 1:
        raise bad_request("top_k", f"top_k: must be an integer >= 1, got {r.top_k}")
    if r.n not in (None, 1):
        raise bad_request("n", f"n: only n=1 is supported, got {r.n}")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(r, name) not in (None, 0):
            raise bad_request(name, f"{name}: not supported (only 0)")
    if r.logit_bias:
        raise bad_request("logit_bias", "logit_bias: not supported")
    if r.stream_options is not None and not r.stream:
        raise bad_request("stream_options", "stream_options: only allowed with stream=true")


def parse_completion(body: bytes) -> CompletionRequest:
    r = _validate(CompletionRequest, body)
    _check_sampling(r)
    if r.echo:
        raise bad_request("echo", "echo: not supported")
    if r.logprobs is not None:
        raise bad_request("logprobs", "logprobs: not supported")
    if r.suffix:
        raise bad_request("suffix", "suffix: not supported")
    if r.best_of not in (None, 1):
        raise bad_request("best_of", f"best_of: only 1 is supported, got {r.best_of}")
    if isinstance(r.prompt, list) and r.prompt and isinstance(r.prompt[0], str | list):
        if len(r.prompt) != 1:
            raise bad_request("prompt", f"prompt: one prompt per request, got a batch of {len(r.prompt)}")
        r.prompt = r.prompt[0]
    return r


def parse_chat(body: bytes) -> ChatRequest:
    r = _validate(ChatRequest, body)
    _check_sampling(r)
    if r.max_completion_tokens is not None:
        if r.max_completion_tokens < 0:
            raise bad_request("max_completion_tokens", f"max_completion_tokens: must be >= 0, got {r.max_completion_tokens}")
        r.max_tokens = r.max_completion_tokens
    if r.logprobs:
        raise bad_request("logprobs", "logprobs: not supported")
    if r.top_logprobs is not None:
        raise bad_request("top_logprobs", "top_logprobs: not supported")
    if r.tools:
        raise bad_request("tools", "tools: not supported")
    if r.response_format and r.response_format.get("type") not in (None, "text"):
        raise bad_request("response_format", "response_format: only {'type': 'text'} is supported")
    if not r.messages:
        raise bad_request("messages", "messages: must contain at least one message")
    return r


def sampling_fields(r: _Sampling) -> dict:
    """`GenerationRequest` keyword arguments (besides prompt and limits) for request `r`.

    OpenAI defaults: temperature 1.0 (0 is greedy), top_p 1 (no truncation).
    """
    temperature = 1.0 if r.temperature is None else float(r.temperature)
    top_p = None if r.top_p is None or r.top_p >= 1 else float(r.top_p)
    return dict(
        temperature=temperature,
        top_p=top_p,
        top_k=r.top_k,
        seed=r.seed,
        stop=tuple(r.stop or ()),
        return_routing=bool(r.return_routing),
    )


# ---- response bodies ------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _extension(token_ids: list[int], routing: list | None) -> dict:
    ext: dict = {"token_ids": token_ids}
    if routing is not None:
        ext["routing"] = routing
    return ext


Kind = Literal["completion", "chat"]


def response(kind: Kind, rid: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
             token_ids: list[int], routing: list | None) -> dict:
    """A whole (non-streamed) ``text_completion`` or ``chat.completion``."""
    if kind == "completion":
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish_reason}
    return {
        "id": rid,
        "object": "text_completion" if kind == "completion" else "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage(prompt_tokens, len(token_ids)),
        "moelab": _extension(token_ids, routing),
    }


def chunk(kind: Kind, rid: str, model: str, created: int, *, text: str | None = None, role: bool = False,
          finish_reason: str | None = None, token_ids: list[int] | None = None, routing: list | None = None,
          usage_: dict | None = None, include_usage: bool = False) -> dict:
    """One streamed chunk. ``usage_`` given: the final usage chunk (no choices)."""
    body: dict = {
        "id": rid,
        "object": "text_completion" if kind == "completion" else "chat.completion.chunk",
        "created": created,
        "model": model,
    }
    if usage_ is not None:
        body["choices"] = []
        body["usage"] = usage_
        return body
    if kind == "completion":
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    else:
        delta: dict = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    body["choices"] = [choice]
    if include_usage:
        body["usage"] = None
    if token_ids is not None:
        body["moelab"] = _extension(token_ids, routing)
    return body


def sse(obj: dict | str) -> bytes:
    """One server-sent event: ``data: {json}\\n\\n`` (or ``data: [DONE]``)."""
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {data}\n\n".encode()
