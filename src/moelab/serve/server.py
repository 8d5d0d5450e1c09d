"""Running the app under uvicorn with a drain that starts before the sockets close.

uvicorn's own shutdown closes its listening sockets, waits for open connections and only
then runs the app's lifespan shutdown. `Server` drains first (`moelab.serve.app.drain`):
while the engine finishes its running requests (or ends them "shutdown" after the drain
timeout) the sockets are still open, so a new request gets a clear 503 instead of a
refused connection, and running streams reach their last chunk.
"""

from __future__ import annotations

import uvicorn

from moelab.serve.app import drain


class Server(uvicorn.Server):
    async def shutdown(self, sockets=None) -> None:
        await drain(self.config.app)
        await super().shutdown(sockets)


def make_server(app, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
                graceful_s: float = 5.0) -> Server:
    """A `Server` for `app`; `graceful_s`: how long, after the drain, open connections get to
    send their last bytes before uvicorn cancels them."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=max(1, round(graceful_s)))
    return Server(config)
