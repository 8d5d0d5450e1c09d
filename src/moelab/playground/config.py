"""`PlaygroundConfig`: what one playground server may read and write, and the folder guard.

The server reads only the folders it was started with: the runs folder (where Break runs
are written, and read back by Compare and Route) and the model folders (trained runs or
imported checkpoints for Route and Compare). Every path a request names goes through
`allowed_path`, which resolves symlinks and ``..`` first, so no spelling escapes the roots.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from moelab.errors import ConfigError, MoelabError


class PathRefused(MoelabError):
    """A request named a path outside the folders the server was started with (HTTP 403);
    `field` is the request field that held it."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class NotFound(MoelabError):
    """A request named a run or model that does not exist (HTTP 404)."""


class FieldError(ConfigError):
    """A request field has a bad value (HTTP 400); `field` is the request field's name, so the
    page can show the message next to its control."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True, kw_only=True)
class PlaygroundConfig:
    """Settings of one playground server. ``runs_dir`` is created on start; ``model_dirs``
    must exist. ``max_queue``: Break runs waiting behind the running one before 429."""

    runs_dir: Path = Path("runs/playground")
    model_dirs: tuple[Path, ...] = field(default_factory=tuple)
    max_queue: int = 8
    python: str | None = None  # the interpreter of the training subprocess (None: this one)

    def __post_init__(self) -> None:
        object.__setattr__(self, "runs_dir", Path(self.runs_dir).resolve())
        dirs = tuple(Path(d).resolve() for d in self.model_dirs)
        for d in dirs:
            if not d.is_dir():
                raise ConfigError(f"PlaygroundConfig.model_dirs: {d} is not a folder")
        object.__setattr__(self, "model_dirs", dirs)
        if not isinstance(self.max_queue, int) or self.max_queue < 0:
            raise ConfigError(f"PlaygroundConfig.max_queue must be an integer >= 0, got {self.max_queue!r}")
        if self.runs_dir.exists() and not self.runs_dir.is_dir():
            raise ConfigError(f"PlaygroundConfig.runs_dir: {self.runs_dir} is a file, not a folder")

    @property
    def roots(self) -> tuple[Path, ...]:
        """Every folder a request may read from: the runs folder first, then the model folders."""
        return (self.runs_dir, *self.model_dirs)


def allowed_path(path: str | Path, roots: tuple[Path, ...], *, field: str) -> Path:
    """`path` resolved (relative paths against the first root), if it lies inside one of
    `roots`; a `PathRefused` naming the request field and the allowed folders otherwise."""
    if not isinstance(path, str | Path) or not str(path):
        raise FieldError(f"{field} must be a non-empty path string, got {path!r}", field)
    p = Path(path)
    resolved = (p if p.is_absolute() else roots[0] / p).resolve()
    if not any(resolved == r or resolved.is_relative_to(r) for r in roots):
        raise PathRefused(f"{field}: {path} is outside the folders this playground serves "
                          f"({', '.join(str(r) for r in roots)})", field)
    return resolved
