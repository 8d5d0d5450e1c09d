"""The OpenAI-compatible FastAPI app in front of an `Engine` (`create_app`).

The asyncio loop only parses, tokenizes, renders chat templates and moves events: the
forward passes run on the engine thread. Each request gets an `asyncio.Queue`; the
engine's callback (on the engine thread) hands events to it with
``loop.call_soon_threadsafe`` and never blocks.

A client that goes away frees its slot: a stream's response calls ``engine.abort`` when
it ends before the request finished (Starlette cancels the stream when the client
disconnects), and a non-streamed request watches for ``http.disconnect`` while it waits.

Drain (`drain`): nothing new is admitted (503, and ``/health`` says "draining"), and
``engine.shutdown(drain_timeout_s)`` runs in a worker thread while the loop keeps
streaming the running requests to their end (or to finish reason "shutdown"). The
lifespan's shutdown runs it; `moelab.serve.server.Server` runs it as soon as a signal
arrives, before uvicorn closes its sockets.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2.exceptions import TemplateError
from starlette.exceptions import HTTPException as StarletteHTTPException

from moelab.data.tokenizer import end_token_ids
from moelab.errors import ConfigError
from moelab.serve.chat import PLAIN_STOP, ChatTemplate, plain_template
from moelab.serve.metrics import ServerMetrics
from moelab.serve.protocol import (
    OPENAI_FINISH_REASON,
    APIError,
    Kind,
    bad_request,
    chunk,
    parse_chat,
    parse_completion,
    response,
    sampling_fields,
    sse,
    usage,
)
from moelab.serve.routing_log import RoutingLog
from moelab.serve.types import EngineClosedError, GenerationRequest, QueueFullError, StreamEvent

log = logging.getLogger(__name__)

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass
class ServerState:
    engine: object
    tokenizer: object
    model_name: str
    api_key: str | None
    chat_template: ChatTemplate
    drain_timeout_s: float
    metrics: ServerMetrics
    end_ids: tuple[int, ...]
    routing_log: RoutingLog | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    draining: bool = False
    _drain_task: asyncio.Future | None = None


def state_of(app: FastAPI) -> ServerState:
    return app.state.moelab


async def drain(app: FastAPI) -> None:
    """Stop admitting and shut the engine down (bounded by ``drain_timeout_s``); idempotent."""
    st = state_of(app)
    st.draining = True
    if st._drain_task is None:
        log.info("draining: admitting nothing new, running requests get %.0f s", st.drain_timeout_s)
        st._drain_task = asyncio.ensure_future(asyncio.to_thread(st.engine.shutdown, st.drain_timeout_s))
    await asyncio.shield(st._drain_task)


def create_app(
    engine,
    tokenizer,
    model_name: str,
    *,
    api_key: str | None = None,
    chat_template: ChatTemplate | None = None,
    drain_timeout_s: float = 30.0,
    start_engine: bool = True,
    offload_store=None,
    routing_log: RoutingLog | None = None,
) -> FastAPI:
    """The app serving `engine` as `model_name`.

    `tokenizer` encodes prompts (a `tokenizers.Tokenizer`: ``encode``, ``token_to_id``,
    ``get_vocab_size``); `chat_template` defaults to the plain one (`moelab.serve.chat`).
    `api_key`: every endpoint but ``/health`` needs ``Authorization: Bearer <api_key>``.
    The lifespan starts the engine (unless `start_engine` is False) and drains it at the end.
    `offload_store`: the `moelab.offload.ExpertStore` of an offloaded model, whose cache
    statistics `/metrics` then shows. `routing_log`: every finished request's routing is
    appended to it (`moelab.serve.routing_log`), whether or not the client asked for it.
    """
    st = ServerState(
        engine=engine, tokenizer=tokenizer, model_name=model_name, api_key=api_key or None,
        chat_template=chat_template or plain_template(), drain_timeout_s=drain_timeout_s,
        metrics=ServerMetrics(engine, offload_store), end_ids=end_token_ids(tokenizer), routing_log=routing_log,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if start_engine:
            engine.start()
        yield
        await drain(app)
        if st.routing_log is not None:
            st.routing_log.close()

    app = FastAPI(title="moelab serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.moelab = st

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(APIError(e.status_code, str(e.detail), code=code).body(), status_code=e.status_code)

    if st.api_key is not None:
        app.add_middleware(_BearerAuth, api_key=st.api_key)

    @app.get("/health")
    async def health():
        if st.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(st.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card() -> dict:
        return {"id": st.model_name, "object": "model", "created": st.created, "owned_by": "moelab",
                "max_model_len": engine.max_len}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        if model != st.model_name:
            raise _unknown_model(st, model)
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        t0 = time.perf_counter()
        r = _rejecting(st, parse_completion, await request.body())
        _check_model(st, r.model)
        if isinstance(r.prompt, str):
            ids = tokenizer.encode(r.prompt, add_special_tokens=False).ids
        else:
            ids = list(r.prompt)
            V = tokenizer.get_vocab_size()
            bad = [t for t in ids if not 0 <= t < V]
            if bad:
                raise bad_request("prompt", f"prompt: token id {bad[0]} is outside [0, {V})")
        max_tokens = COMPLETION_DEFAULT_MAX_TOKENS if r.max_tokens is None else r.max_tokens
        return await _generate(st, request, "completion", r, ids, max_tokens, "prompt", (), t0)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        t0 = time.perf_counter()
        r = _rejecting(st, parse_chat, await request.body())
        _check_model(st, r.model)
        messages = [{"role": m.role, "content": m.text(i)} for i, m in enumerate(r.messages)]
        try:
            text = st.chat_template.render(messages)
        except TemplateError as e:
            raise bad_request("messages", f"messages: the chat template refused them: {e}") from None
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        max_tokens = r.max_tokens
        if max_tokens is None:
            max_tokens = max(engine.max_len - len(ids), 0)
        extra_stop = PLAIN_STOP if st.chat_template.is_plain else ()
        return await _generate(st, request, "chat", r, ids, max_tokens, "messages", extra_stop, t0)

    return app


class _BearerAuth:
    """Every path but ``/health`` needs ``Authorization: Bearer <key>`` (401 otherwise).

    Plain ASGI rather than ``@app.middleware``: Starlette's BaseHTTPMiddleware stands
    between a stream and its client and would hide the disconnect that aborts a request.
    """

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(token.strip(), self.key):
                e = APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                             code="invalid_api_key")
                await JSONResponse(e.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})(
                    scope, receive, send)
                return
        await self.app(scope, receive, send)


def _rejecting(st: ServerState, parse, body: bytes):
    try:
        return parse(body)
    except APIError:
        st.metrics.rejected.labels("invalid").inc()
        raise


def _unknown_model(st: ServerState, name: str) -> APIError:
    return APIError(404, f"model: {name!r} is not served here; this server serves {st.model_name!r}",
                    param="model", code="model_not_found")


def _check_model(st: ServerState, name: str) -> None:
    if name != st.model_name:
        st.metrics.rejected.labels("invalid").inc()
        raise _unknown_model(st, name)


def _param_of(e: ConfigError) -> str | None:
    head, sep, _ = str(e).partition(":")
    return head if sep and head.isidentifier() else None


class _Timing:
    """Client-side latencies of one request, observed into the server's histograms; and
    its token ids and routing, for the routing log."""

    def __init__(self, metrics: ServerMetrics, t0: float, log: RoutingLog | None = None, rid: str = "",
                 prompt_tokens: int = 0):
        self.m, self.t0, self.last = metrics, t0, None
        self.log, self.rid, self.prompt_tokens = log, rid, prompt_tokens
        self.token_ids: list[int] = []
        self.routing: list[dict] = []

    def event(self, ev: StreamEvent) -> None:
        self.tokens(len(ev.token_ids))
        if self.log is not None:
            self.token_ids += ev.token_ids
            self.routing += ev.routing or []
            if ev.finish_reason is not None:
                self.log.write(self.rid, ev.finish_reason, self.prompt_tokens, self.token_ids, self.routing)

    def tokens(self, n: int) -> None:
        if not n:
            return
        now = time.perf_counter()
        if self.last is None:
            self.m.ttft.observe(now - self.t0)
            n -= 1
        else:
            gap = (now - self.last) / n
            for _ in range(n):
                self.m.itl.observe(gap)
        self.last = now

    def done(self) -> None:
        self.m.e2e.observe(time.perf_counter() - self.t0)


async def _generate(st: ServerState, request: Request, kind: Kind, r, ids: list[int], max_tokens: int,
                    prompt_param: str, extra_stop: tuple[str, ...], t0: float) -> Response:
    """Submit one request to the engine and answer it, streamed or whole."""
    engine = st.engine
    if not ids:
        raise bad_request(prompt_param, f"{prompt_param}: the prompt is empty (0 tokens)")
    if len(ids) >= engine.max_len:
        raise bad_request(prompt_param, f"{prompt_param}: the prompt has {len(ids)} tokens; this model's context is "
                          f"{engine.max_len} tokens, which leaves no room to generate", code="context_length_exceeded")
    if len(ids) + max_tokens > engine.max_len:
        raise bad_request("max_tokens", f"max_tokens: {len(ids)} prompt tokens + max_tokens={max_tokens} exceed "
                          f"this model's context of {engine.max_len} tokens", code="context_length_exceeded")
    if st.draining:
        st.metrics.rejected.labels("draining").inc()
        raise APIError(503, "the server is shutting down and admits no new requests",
                       type="service_unavailable", code="draining")
    fields = sampling_fields(r)
    want_routing = fields["return_routing"]
    fields["return_routing"] = want_routing or st.routing_log is not None  # the log records every request
    fields["stop"] = fields["stop"] + tuple(s for s in extra_stop if s not in fields["stop"])
    rid = f"{'cmpl' if kind == 'completion' else 'chatcmpl'}-{uuid.uuid4().hex}"
    try:
        gen = GenerationRequest(prompt_ids=tuple(ids), max_tokens=max_tokens,
                                stop_token_ids=() if r.ignore_eos else st.end_ids,
                                request_id=rid, **fields)
    except ConfigError as e:
        raise bad_request(_param_of(e), str(e)) from None

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[StreamEvent] = asyncio.Queue()

    def on_event(ev: StreamEvent) -> None:  # engine thread: hand over, never block
        try:
            loop.call_soon_threadsafe(queue.put_nowait, ev)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    try:
        engine.submit(gen, on_event)
    except QueueFullError as e:
        st.metrics.rejected.labels("queue_full").inc()
        raise APIError(429, f"the server is busy: {e}", type="rate_limit_error", code="queue_full",
                       headers={"Retry-After": str(max(1, math.ceil(e.retry_after_s)))}) from None
    except EngineClosedError as e:
        st.metrics.rejected.labels("draining").inc()
        raise APIError(503, f"the server is shutting down: {e}", type="service_unavailable", code="draining") from None
    except ConfigError as e:
        st.metrics.rejected.labels("invalid").inc()
        raise bad_request(_param_of(e), str(e)) from None

    timing = _Timing(st.metrics, t0, st.routing_log, rid, len(ids))
    if r.stream:
        include_usage = bool(r.stream_options and r.stream_options.include_usage)
        stream = _Stream(engine, rid)
        stream.body_iterator = _sse(stream, queue, timing, kind, rid, st.model_name, len(ids), include_usage,
                                    want_routing)
        return stream
    return await _whole(engine, request, queue, timing, kind, rid, st.model_name, len(ids), want_routing)


async def _whole(engine, request: Request, queue: asyncio.Queue, timing: _Timing, kind: Kind, rid: str,
                 model: str, prompt_tokens: int, want_routing: bool) -> Response:
    """Wait for the whole answer, aborting the request if the client disconnects first."""
    text, token_ids, routing = [], [], []
    finished = False
    disconnect = asyncio.ensure_future(_disconnected(request))
    try:
        while True:
            get = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({get, disconnect}, return_when=asyncio.FIRST_COMPLETED)
            if get not in done:
                get.cancel()
                log.info("%s: client disconnected; aborting", rid)
                return Response(status_code=499)  # nobody reads it
            ev: StreamEvent = get.result()
            timing.event(ev)
            text.append(ev.text)
            token_ids += ev.token_ids
            if ev.routing:
                routing += ev.routing
            if ev.finish_reason is not None:
                finished = True
                timing.done()
                if ev.finish_reason == "error":
                    raise APIError(500, f"generation failed: {ev.error}", type="server_error", code="engine_error")
                body = response(kind, rid, model, "".join(text), OPENAI_FINISH_REASON[ev.finish_reason],
                                prompt_tokens, token_ids, routing if want_routing else None)
                return JSONResponse(body)
    finally:
        disconnect.cancel()
        if not finished:
            engine.abort(rid)


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body has been read, so only a disconnect is left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _Stream(StreamingResponse):
    """An SSE response that aborts its engine request if it ends before the request did
    (the client disconnected: Starlette cancels the stream; or it was never started)."""

    def __init__(self, engine, rid: str):
        super().__init__(iter(()), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.engine, self.rid, self.finished = engine, rid, False

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.finished:
                log.info("%s: stream ended early (client disconnected?); aborting", self.rid)
                self.engine.abort(self.rid)


async def _sse(stream: _Stream, queue: asyncio.Queue, timing: _Timing, kind: Kind, rid: str, model: str,
               prompt_tokens: int, include_usage: bool, want_routing: bool):
    created = int(time.time())

    def c(**kw) -> bytes:
        return sse(chunk(kind, rid, model, created, include_usage=include_usage, **kw))

    if kind == "chat":
        yield c(role=True, text="")
    n = 0
    while True:
        ev: StreamEvent = await queue.get()
        timing.event(ev)
        routing = ev.routing if want_routing else None
        n += len(ev.token_ids)
        if ev.finish_reason is None:
            if ev.token_ids or ev.text:
                yield c(text=ev.text, token_ids=ev.token_ids, routing=routing)
            continue
        stream.finished = True
        timing.done()
        if ev.finish_reason == "error":
            err = APIError(500, f"generation failed: {ev.error}", type="server_error", code="engine_error")
            yield sse(err.body())
        else:
            reason = OPENAI_FINISH_REASON[ev.finish_reason]
            if ev.token_ids or ev.text:
                yield c(text=ev.text, token_ids=ev.token_ids, routing=routing, finish_reason=reason)
            else:
                yield c(text=None if kind == "chat" else "", finish_reason=reason)
            if include_usage:
                yield c(usage_=usage(prompt_tokens, n))
        yield sse("[DONE]")
        return
