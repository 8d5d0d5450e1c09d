"""Optional `multilingual` domain from Debian text packages, when installed.

Never required: with none of these packages the domain is simply absent. Two
sources are used (install with `apt-get install debian-reference fortunes-de
fortunes-es ...`):

* `debian-reference-*`: the Debian Reference manual, the same text in about a
  dozen languages, as `/usr/share/debian-reference/debian-reference.<lang>.txt.gz`;
* `fortunes-*` (language packs only): `/usr/share/games/fortunes/<lang>/<file>`,
  fortunes separated by `%` lines. The English top-level files and the `off/`
  (offensive) folders are skipped.
"""

from __future__ import annotations

import gzip
import logging
import re
from collections.abc import Iterator
from pathlib import Path

from moelab.data.text import chunk_text

logger = logging.getLogger(__name__)

DEBIAN_REFERENCE_DIR = Path("usr/share/debian-reference")
FORTUNES_DIR = Path("usr/share/games/fortunes")
EXTRA_DOC_CHARS = 16_000  # manual chapters are long; cut into documents of this size
_REFERENCE_NAME = re.compile(r"^debian-reference\.([A-Za-z_-]+)\.txt(\.gz)?$")


def multilingual_files(root: Path = Path("/")) -> list[tuple[str, Path]]:
    """`(source_label, path)` of every multilingual source file found, sorted by label."""
    found: list[tuple[str, Path]] = []
    ref_dir = root / DEBIAN_REFERENCE_DIR
    if ref_dir.is_dir():
        for path in ref_dir.iterdir():
            match = _REFERENCE_NAME.match(path.name)
            if match and path.is_file():
                found.append((f"debian-reference:{match.group(1)}", path))
    fortune_dir = root / FORTUNES_DIR
    if fortune_dir.is_dir():
        for lang_dir in fortune_dir.iterdir():
            if not lang_dir.is_dir() or lang_dir.name == "off":
                continue
            for path in lang_dir.rglob("*"):
                rel = path.relative_to(lang_dir)
                # `.dat` are binary indexes, `.u8` symlinks to the same text.
                if (
                    path.is_file()
                    and not path.is_symlink()
                    and path.suffix not in {".dat", ".u8"}
                    and "off" not in rel.parts
                ):
                    found.append((f"fortunes:{lang_dir.name}/{rel.as_posix()}", path))
    found.sort(key=lambda item: item[0])
    return found


def _read_text(path: Path) -> str | None:
    try:
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
        return data.decode("utf-8")
    except (OSError, EOFError, gzip.BadGzipFile, UnicodeDecodeError) as exc:
        logger.debug("skipping %s: %s", path, exc)
        return None


def multilingual_texts(root: Path = Path("/")) -> Iterator[tuple[str, str]]:
    """`(text, source)` documents from the installed packages, file by file."""
    files = multilingual_files(root)
    if not files:
        logger.warning(
            "extra domains requested but none found under %s (install e.g. the Debian "
            "packages debian-reference and fortunes-de); continuing without them",
            root,
        )
    for label, path in files:
        text = _read_text(path)
        if text is None:
            continue
        if label.startswith("fortunes:"):
            # One fortune per paragraph, so chunking packs whole fortunes together.
            fortunes = [f.strip("\n") for f in re.split(r"^%\s*$", text, flags=re.M)]
            text = "\n\n".join(f for f in fortunes if f.strip())
        for i, piece in enumerate(chunk_text(text, EXTRA_DOC_CHARS)):
            yield piece + "\n", f"{label}#{i}"
