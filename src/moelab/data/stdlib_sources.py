"""The `code` and `prose` domains, read from the running Python's standard library.

Every machine with Python has these files, so the default corpus needs no
download. Two rules keep the selection identical on every machine with the
same Python version, although the stdlib lives at different paths:

* files are named by their path *relative to the stdlib root* (POSIX form), and
  visited in the order of a stable hash of that name, never in `os.walk` order;
* build-specific files (`_sysconfigdata_*`, `config-*/`), installed packages
  (`site-packages`), tests with deliberately odd encodings, and generated tables
  (`encodings/`) are excluded.

The hash also splits the files in two halves: `code` reads the source of one
half and `prose` the docstrings and comments of the other, so no text appears
in both domains (a docstring is otherwise in the code file it came from).
"""

from __future__ import annotations

import ast
import logging
import os
import re
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from moelab.data.text import stable_hash

logger = logging.getLogger(__name__)

# Directory names skipped anywhere in the tree. `test`/`tests`/`idle_test` hold
# files in legacy encodings and huge fixtures; `encodings` is generated codec
# tables; `pydoc_data` is the reference manual, used for `prose` instead.
_EXCLUDED_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "__pycache__",
        "test",
        "tests",
        "idle_test",
        "encodings",
        "pydoc_data",
        "lib-dynload",
        "ensurepip",
    }
)
# Build-specific or generated: differ between machines with the same version.
_EXCLUDED_FILE = re.compile(
    r"^_sysconfigdata.*\.py$|^sitecustomize\.py$|^_distutils_system_mod\.py$"
)

# A full-line comment; `#!` shebangs and `# -*- coding` lines are dropped later.
_COMMENT_LINE = re.compile(r"^\s*#(.*)$")
_NOISE_COMMENT = re.compile(r"^\s*(!|-\*-|noqa|type:|pragma|fmt:|pylint|XXX\s*$|[-=#*~_ ]*$)")
_WORD = re.compile(r"[A-Za-z]{2,}")


def stdlib_root() -> Path:
    """The directory of the pure-Python standard library of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_python_files(root: Path | None = None) -> list[tuple[str, Path]]:
    """`(relative_posix_name, path)` for each stdlib `.py` file, sorted by name."""
    root = stdlib_root() if root is None else root
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [
            d for d in dirnames if d not in _EXCLUDED_DIRS and not d.startswith("config-")
        ]
        for name in filenames:
            if name.endswith(".py") and not _EXCLUDED_FILE.match(name):
                path = Path(dirpath, name)
                found.append((path.relative_to(root).as_posix(), path))
    found.sort()
    return found


def _halves(root: Path | None) -> tuple[list[tuple[str, Path]], list[tuple[str, Path]]]:
    """The stdlib files split by hash into (code half, prose half), each in hash order."""
    ranked = sorted(stdlib_python_files(root), key=lambda item: stable_hash("stdlib", item[0]))
    code = [item for item in ranked if stable_hash("stdlib-half", item[0]) % 2 == 0]
    prose = [item for item in ranked if stable_hash("stdlib-half", item[0]) % 2 == 1]
    return code, prose


def _read_utf8(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        logger.debug("skipping %s: %s", path, exc)
        return None


def code_texts(root: Path | None = None) -> Iterator[tuple[str, str]]:
    """`(source_text, "stdlib:<name>")` for the code half, one document per file."""
    for name, path in _halves(root)[0]:
        text = _read_utf8(path)
        if text and text.strip():
            yield text, f"stdlib:{name}"


def pydoc_topic_texts() -> Iterator[tuple[str, str]]:
    """The reference-manual topics that `help()` shows, one document per topic."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        text = topics[key].strip()
        if text:
            yield text + "\n", f"pydoc_data:{key}"


def docstrings_and_comments(source: str) -> list[str]:
    """Docstrings and full-line comment blocks of a module, in source order.

    Comments are found by line pattern rather than `tokenize` (4x slower over the
    stdlib); lines inside multi-line string literals, which `ast` locates, are
    excluded so a `#` inside a docstring is not mistaken for a comment.
    """
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    blocks: list[tuple[int, str]] = []
    in_string: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(_WORD.findall(doc)) >= 3:
                lineno = getattr(node, "lineno", 0)
                blocks.append((lineno, doc))
        elif isinstance(node, ast.Constant | ast.JoinedStr) and node.end_lineno:
            in_string.update(range(node.lineno + 1, node.end_lineno + 1))
    current: list[str] = []
    start = 0
    lines = source.splitlines()
    for lineno, line in enumerate(lines + [""], start=1):
        match = None if lineno in in_string else _COMMENT_LINE.match(line)
        body = match.group(1) if match else None
        if body is not None and not _NOISE_COMMENT.match(body):
            if not current:
                start = lineno
            current.append(body[1:] if body.startswith(" ") else body)
            continue
        if body is not None:  # a noise line (a linter pragma, a ruler) ends nothing; skip it
            continue
        if current and len(_WORD.findall(" ".join(current))) >= 5:
            blocks.append((start, "\n".join(current).strip()))
        current = []
    blocks.sort(key=lambda item: item[0])
    return [text for _, text in blocks]


def prose_texts(root: Path | None = None, *, min_chars: int = 200) -> Iterator[tuple[str, str]]:
    """The reference manual, then per-file docstrings and comments of the prose half."""
    yield from pydoc_topic_texts()
    for name, path in _halves(root)[1]:
        source = _read_utf8(path)
        if not source:
            continue
        text = "\n\n".join(docstrings_and_comments(source))
        if len(text) >= min_chars:
            yield text + "\n", f"stdlib-docs:{name}"
