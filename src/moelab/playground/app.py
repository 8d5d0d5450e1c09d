"""The playground's FastAPI app (`create_app`) and its uvicorn server (`make_server`).

The JSON API is the contract (docs/playground.md); the page in ``static/`` only shows what
it returns. Errors are one JSON shape, ``{"error": {"message", "field"}}``: 400 for a bad
value (the library's own one-line message, `field` naming the control), 403 for a path
outside the served folders, 404 for an unknown run or route, 429 when the Break queue is
full; never a 500 for anything a user can type.

Slow work (sizing a meta-device model, loading a checkpoint, routing a sentence) runs in
the threadpool, not on the event loop; training runs in a subprocess (`runs`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from moelab.errors import MoelabError
from moelab.lab.experiments import EXPERIMENTS
from moelab.playground import compare, route, sizing
from moelab.playground.config import (
    FieldError,
    NotFound,
    PathRefused,
    PlaygroundConfig,
    allowed_path,
)
from moelab.playground.runs import (
    EXPERIMENT_KNOBS,
    KNOBS,
    PLAYGROUND_SCALES,
    TERMINAL,
    BreakRequest,
    MetricsTail,
    QueueFull,
    RunManager,
    events_of,
    verdict_of,
)

logger = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
POLL_S = 0.25  # how often an event stream looks at the run's files
KEEPALIVE_S = 10.0


def _error(status: int, message: str, field: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "field": field}}, status_code=status)


def _status_of(e: Exception) -> int:
    if isinstance(e, PathRefused):
        return 403
    if isinstance(e, NotFound):
        return 404
    if isinstance(e, QueueFull):
        return 429
    return 400


async def _body(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise FieldError("the request body must be a JSON object", None) from None
    if not isinstance(body, dict):
        raise FieldError("the request body must be a JSON object", None)
    return body


def create_app(cfg: PlaygroundConfig, *, manager: RunManager | None = None) -> FastAPI:
    """The app for `cfg`; it creates ``cfg.runs_dir`` and owns a `RunManager` (stopped, its
    running training checkpointed, at shutdown)."""
    cfg.runs_dir.mkdir(parents=True, exist_ok=True)
    runs = manager or RunManager(cfg.runs_dir, max_queue=cfg.max_queue, python=cfg.python)
    models = route.ModelCache()
    closing = threading.Event()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        closing.set()
        await run_in_threadpool(runs.shutdown)

    app = FastAPI(title="moelab playground", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.runs, app.state.closing, app.state.config = runs, closing, cfg

    @app.exception_handler(MoelabError)
    async def _moelab_error(request: Request, e: MoelabError) -> JSONResponse:
        return _error(_status_of(e), str(e), getattr(e, "field", None))

    @app.exception_handler(ValueError)
    async def _value_error(request: Request, e: ValueError) -> JSONResponse:
        return _error(400, str(e), getattr(e, "field", None))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        message = f"no such endpoint: {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return _error(e.status_code, message)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        logger.exception("playground: %s %s failed", request.method, request.url.path)
        return _error(500, f"internal error ({type(e).__name__}: {e}); see the server log")

    async def call(fn: Callable[..., Any], *args: Any) -> Any:
        return await run_in_threadpool(fn, *args)

    # ------------------------------------------------------------------ page

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # ------------------------------------------------------------------ size

    @app.get("/api/presets")
    async def presets() -> dict[str, Any]:
        return {"presets": await call(sizing.presets),
                "controls": [{"name": n, "label": label, "default": d} for n, label, d in sizing.CONTROLS],
                "settings": sizing.SETTINGS_DEFAULTS, "dtypes": list(sizing.BYTES_PER_PARAM)}

    @app.post("/api/size")
    async def size(request: Request) -> dict[str, Any]:
        body = await _body(request)
        settings = body.get("settings")
        given = [k for k in ("model", "preset", "path", "config_text") if k in body]
        if len(given) != 1:
            raise FieldError("give exactly one of model (the controls), preset, path or config_text", None)
        if "model" in body:
            if not isinstance(body["model"], dict):
                raise FieldError("model must be an object of controls", "model")
            return await call(sizing.size_controls, body["model"], settings)
        if "preset" in body:
            return await call(sizing.size_named, body["preset"], settings)
        if "path" in body:
            return await call(sizing.size_path, allowed_path(body["path"], cfg.roots, field="path"), settings)
        return await call(sizing.size_upload, body["config_text"], body.get("filename") or "config.json", settings)

    @app.post("/api/size/config.json")
    async def size_config(request: Request) -> dict[str, Any]:
        body = await _body(request)
        return await call(sizing.moelab_config_json, body.get("model") or {})

    # ------------------------------------------------------------------ route

    @app.get("/api/models")
    async def list_models() -> dict[str, Any]:
        return {"models": await call(route.find_models, cfg.roots)}

    @app.post("/api/route")
    async def route_text(request: Request) -> dict[str, Any]:
        body = await _body(request)
        path = allowed_path(body.get("model"), cfg.roots, field="model")
        if not path.exists():
            raise NotFound(f"model: {body.get('model')} does not exist")
        return await call(route.route_text, models, path, body.get("text"))

    # ------------------------------------------------------------------ break

    @app.get("/api/runs")
    async def list_runs() -> dict[str, Any]:
        return {"runs": runs.listing(), "experiments": list(EXPERIMENTS), "knobs": list(KNOBS),
                "experiment_knobs": {e: list(EXPERIMENT_KNOBS.get(e, KNOBS)) for e in EXPERIMENTS},
                "scales": {name: {k: lab.to_dict()[k] for k in KNOBS} for name, lab in PLAYGROUND_SCALES.items()}}

    @app.post("/api/runs", status_code=202)
    async def start_run(request: Request) -> dict[str, Any]:
        body = await _body(request)
        unknown = set(body) - {"experiment", "scale", "knobs"}
        if unknown:
            raise FieldError(f"unknown field(s) {sorted(unknown)}; give experiment, scale, knobs", sorted(unknown)[0])
        req = BreakRequest(experiment=body.get("experiment"), scale=body.get("scale", "tiny"),
                           knobs=body.get("knobs") or {})
        run = runs.submit(req)
        return run.to_dict(runs.queue_position(run.id))

    @app.get("/api/runs/{run_id}")
    async def get_run(run_id: str) -> dict[str, Any]:
        run = runs.get(run_id)
        verdict = await call(verdict_of, run.folder) if run.state == "done" else None
        return run.to_dict(runs.queue_position(run_id)) | {"verdict": verdict}

    @app.post("/api/runs/{run_id}/stop")
    async def stop_run(run_id: str) -> dict[str, Any]:
        run = runs.stop(run_id)
        return run.to_dict(runs.queue_position(run_id))

    @app.post("/api/runs/{run_id}/resume")
    async def resume_run(run_id: str) -> dict[str, Any]:
        run = runs.resume(run_id)
        return run.to_dict(runs.queue_position(run_id))

    @app.get("/api/runs/{run_id}/events")
    async def run_events(run_id: str) -> StreamingResponse:
        runs.get(run_id)  # an unknown id: 404 before the stream starts
        return StreamingResponse(_stream(run_id), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _stream(run_id: str) -> AsyncIterator[str]:
        run = runs.get(run_id)
        tail = MetricsTail(run.folder)
        last_status: tuple | None = None
        idle = 0.0
        while True:
            status = (run.state, runs.queue_position(run_id))
            if status != last_status:
                last_status = status
                yield _sse("status", run.to_dict(status[1]))
            rows = await call(tail.read)
            for name, data in events_of(rows):
                yield _sse(name, data)
            if rows:
                idle = 0.0
            if run.state in TERMINAL:
                for name, data in events_of(await call(tail.read)):  # rows written before the exit
                    yield _sse(name, data)
                if run.state == "done":
                    yield _sse("verdict", await call(verdict_of, run.folder))
                yield _sse("end", run.to_dict())
                return
            if closing.is_set():
                yield _sse("end", run.to_dict() | {"note": "the playground is shutting down"})
                return
            await asyncio.sleep(POLL_S)
            idle += POLL_S
            if idle >= KEEPALIVE_S:
                idle = 0.0
                yield ": keepalive\n\n"

    # ------------------------------------------------------------------ compare

    @app.get("/api/compare")
    async def compare_runs() -> dict[str, Any]:
        return {"runs": await call(compare.finished_runs, cfg.roots)}

    @app.post("/api/compare/pair")
    async def compare_pair(request: Request) -> dict[str, Any]:
        body = await _body(request)
        rows = {}
        for role, kind in (("moe", "MoE"), ("dense", "dense")):
            path = allowed_path(body.get(role), cfg.roots, field=role)
            root = next(r for r in cfg.roots if path == r or path.is_relative_to(r))
            row = await call(compare.run_summary, path, root)
            if row is None:
                raise NotFound(f"{role}: {body.get(role)} is not a run with metrics")
            if row["kind"] != kind:
                raise FieldError(f"{role}: {row['name']} is a {row['kind']} run; expected a {kind} run", role)
            rows[role] = row
        return compare.moe_vs_dense(rows["moe"], rows["dense"])

    return app


def _sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


class PlaygroundServer(uvicorn.Server):
    """uvicorn, with the Break runs stopped (checkpointed) *before* uvicorn waits for open
    connections: the event streams then end by themselves instead of being cut."""

    async def shutdown(self, sockets=None) -> None:
        app = self.config.app
        app.state.closing.set()
        await asyncio.get_running_loop().run_in_executor(None, app.state.runs.shutdown)
        await super().shutdown(sockets)


def make_server(app: FastAPI, *, host: str = "127.0.0.1", port: int = 8765,
                log_level: str = "info") -> PlaygroundServer:
    return PlaygroundServer(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                                           timeout_graceful_shutdown=3))
