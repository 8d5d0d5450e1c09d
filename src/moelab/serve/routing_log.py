"""The served traffic's routing, one JSON line per finished request (`moelab serve
--routing-log`), for `moelab analyze --traffic` (`moelab.lab.traffic`).

A line: ``{"id", "model", "num_experts", "finish_reason", "prompt_tokens", "token_ids",
"routing"}`` with ``routing`` per generated token ``{"<layer>": {"experts", "weights"}}``
(the position that produced the token, as `generate`'s record). Each line is written with
one ``write`` and flushed, so a killed server leaves at most a torn last line, which the
reader skips with a warning. The log refuses an existing file unless told to overwrite.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from moelab.errors import ConfigError


class RoutingLog:
    def __init__(self, path: str | Path, *, num_experts: int, model: str, overwrite: bool = False):
        self.path = Path(path)
        if self.path.is_dir():
            raise ConfigError(f"--routing-log {self.path}: is a folder; give a file path")
        if not self.path.parent.is_dir():
            raise ConfigError(f"--routing-log {self.path}: the folder {self.path.parent} does not exist")
        try:
            self._f = open(self.path, "w" if overwrite else "x", encoding="utf-8")  # noqa: SIM115 (closed in close())
        except FileExistsError:
            raise ConfigError(f"--routing-log {self.path}: exists; pass --overwrite to replace it") from None
        self.num_experts, self.model = num_experts, model
        self._lock = threading.Lock()
        self.records = 0

    def write(self, request_id: str, finish_reason: str, prompt_tokens: int, token_ids: list[int],
              routing: list[dict]) -> None:
        line = json.dumps({"id": request_id, "model": self.model, "num_experts": self.num_experts,
                           "finish_reason": finish_reason, "prompt_tokens": prompt_tokens,
                           "token_ids": token_ids, "routing": routing})
        with self._lock:
            if self._f.closed:
                return
            self._f.write(line + "\n")
            self._f.flush()
            self.records += 1

    def close(self) -> None:
        with self._lock:
            self._f.close()
