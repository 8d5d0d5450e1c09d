"""What the serving engine and the HTTP layer say to each other (no torch here).

The HTTP layer (asyncio) never runs a forward pass: it validates a request, turns it into
a `GenerationRequest` and hands it to `Engine.submit` together with a callback. The engine
thread calls that callback with a `StreamEvent` for every step that produced text for the
request, and exactly once with ``finish_reason`` set, whatever happens (finished,
aborted, shut down, or an error inside the engine). The callback runs on the engine
thread: it must only hand the event over (``loop.call_soon_threadsafe``), never block.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from moelab.errors import ConfigError

# Why a request ended:
#   "stop": a stop token (e.g. end of text) or a stop string;
#   "length": max_tokens reached;
#   "abort": `Engine.abort` (the client went away);
#   "shutdown": the engine stopped (drain timeout) before the request finished;
#   "error": the engine failed on this request (``StreamEvent.error`` says why).
FINISH_REASONS = ("stop", "length", "abort", "shutdown", "error")


@dataclass(frozen=True, kw_only=True)
class GenerationRequest:
    """One request as the engine sees it: token ids in, sampling settings, limits.

    ``temperature=0`` is greedy. ``seed`` makes a sampled request reproducible whatever
    else is batched with it (each request samples from its own generator).
    """

    prompt_ids: tuple[int, ...]
    max_tokens: int
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    return_routing: bool = False
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ConfigError("prompt: must have at least one token")
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 0:
            raise ConfigError(f"max_tokens: must be an integer >= 0, got {self.max_tokens!r}")
        t = self.temperature
        if not (isinstance(t, int | float) and not isinstance(t, bool) and math.isfinite(t) and t >= 0):
            raise ConfigError(f"temperature: must be a finite number >= 0, got {t!r}")
        if self.top_p is not None and not (isinstance(self.top_p, int | float) and 0 < self.top_p <= 1):
            raise ConfigError(f"top_p: must be in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 1):
            raise ConfigError(f"top_k: must be an integer >= 1, got {self.top_k!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ConfigError(f"seed: must be an integer, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ConfigError(f"stop: must be non-empty strings, got {list(self.stop)!r}")


@dataclass
class StreamEvent:
    """New output of one request after an engine step.

    ``token_ids``: the tokens this step added (a stop token is included, its text is not);
    ``text``: the text that is safe to show now (held back while it may still become a
    stop string or an incomplete UTF-8 character; flushed on the final event);
    ``routing``: with ``return_routing``, per added token ``{layer: {"experts", "weights"}}``.
    """

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # so far, including this event's
    routing: list[dict] | None = None
    error: str | None = None


EventCallback = Callable[[StreamEvent], None]


class QueueFullError(Exception):
    """The waiting queue is at ``EngineConfig.max_queue``: answer 429 with Retry-After."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineClosedError(Exception):
    """The engine is draining or stopped and admits nothing new: answer 503."""
