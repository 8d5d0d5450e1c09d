"""Documents with domain labels: the default corpus, user data, and the split.

The default corpus needs nothing but Python. Four domains, each capped at
`max_chars_per_domain` characters so they stay roughly balanced:

* `code`  - Python standard library source (one file per document);
* `prose` - the Python reference manual (`pydoc_data`) and the docstrings and
  comments of *other* stdlib files (so no text is in both domains);
* `math`  - generated arithmetic/algebra/calculus problems with worked answers;
* `data`  - generated JSON, JSON Lines and CSV records.

`extra_domains=True` adds `multilingual` from Debian text packages when they
are installed (see `moelab.data.extras`). User data (`load_user_data`) is text
files, folders of them, or JSONL with a `text` field.

The train/validation split (`split_documents`) depends only on a hash of each
document's domain and text, so it is the same on every machine and in any order.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from moelab.data import extras, stdlib_sources, synthetic
from moelab.data.text import chunk_text, stable_hash, truncate_at_line
from moelab.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

DEFAULT_DOMAINS = ("code", "prose", "math", "data")
EXTRA_DOMAINS = ("multilingual",)
# ~2 MB per domain (prose has ~1.9 MB in all): enough text for a small BPE and short training runs, while
# building the corpus and training the tokenizer stays within seconds on 2 cores.
DEFAULT_MAX_CHARS_PER_DOMAIN = 2_000_000
USER_DOC_CHARS = 16_000  # long user text files are cut into documents of this size
JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson"})
# A document cut at the cap is kept only if this much of it fits (no stubs).
_MIN_PARTIAL_CHARS = 256


@dataclass(frozen=True)
class Document:
    """One training document. `source` says where it came from (for humans only)."""

    text: str
    domain: str
    source: str


def _take(pairs: Iterable[tuple[str, str]], domain: str, max_chars: int | None) -> list[Document]:
    """Documents from `(text, source)` pairs until `max_chars` characters are reached.

    The document that crosses the cap is cut at a line end, so the cap is exact
    and no domain is dominated by one long final file.
    """
    docs: list[Document] = []
    total = 0
    for text, source in pairs:
        if max_chars is not None and total + len(text) > max_chars:
            room = max_chars - total
            if room >= _MIN_PARTIAL_CHARS:
                cut = truncate_at_line(text, room)
                if cut.strip():
                    docs.append(Document(text=cut, domain=domain, source=f"{source} (truncated)"))
            break
        docs.append(Document(text=text, domain=domain, source=source))
        total += len(text)
    return docs


def build_default_corpus(
    *,
    seed: int = 0,
    max_chars_per_domain: int | None = DEFAULT_MAX_CHARS_PER_DOMAIN,
    extra_domains: bool = False,
    extras_root: Path = Path("/"),
) -> list[Document]:
    """The default multi-domain corpus, identical for a given seed and Python version.

    `seed` drives the generated `math` and `data` domains; the stdlib domains
    depend only on the Python version. With `max_chars_per_domain=None` the
    stdlib domains are uncapped and the generated ones are made as large as the
    `code` domain (they are infinite streams). `extras_root` exists for tests.
    """
    if max_chars_per_domain is not None and max_chars_per_domain < _MIN_PARTIAL_CHARS:
        raise ConfigError(
            f"max_chars_per_domain must be None or >= {_MIN_PARTIAL_CHARS}, got {max_chars_per_domain}"
        )
    code = _take(stdlib_sources.code_texts(), "code", max_chars_per_domain)
    prose = _take(stdlib_sources.prose_texts(), "prose", max_chars_per_domain)
    generated_cap = max_chars_per_domain
    if generated_cap is None:
        generated_cap = sum(len(d.text) for d in code)
    math = _take(synthetic.math_problems(seed), "math", generated_cap)
    data = _take(synthetic.data_records(seed), "data", generated_cap)
    docs = code + prose + math + data
    if extra_domains:
        docs += _take(
            _hash_ordered(extras.multilingual_texts(extras_root)),
            "multilingual",
            max_chars_per_domain,
        )
    for domain in DEFAULT_DOMAINS + (EXTRA_DOMAINS if extra_domains else ()):
        part = [d for d in docs if d.domain == domain]
        logger.info(
            "corpus domain %-12s %6d docs %10d chars",
            domain,
            len(part),
            sum(len(d.text) for d in part),
        )
    return docs


def _hash_ordered(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Pairs in stable-hash order of their source, so a cap samples all languages."""
    return sorted(pairs, key=lambda pair: stable_hash("extra", pair[1]))


# ---------------------------------------------------------------- user data


def user_data_files(paths: Sequence[str | Path]) -> list[tuple[Path, str, str]]:
    """`(file, default_domain, label)` for every file that `paths` names, in a fixed order.

    A file's default domain is its name without suffix (`shakespeare.txt` ->
    `shakespeare`); files found in a folder take the folder's name, so one
    folder is one domain. Hidden files and folders (`.git`) are skipped.
    Raises `DataError` for a missing path or an empty folder.
    """
    if isinstance(paths, str | Path):
        paths = [paths]
    if not paths:
        raise DataError("no data paths given; expected text files, folders or .jsonl files")
    found: list[tuple[Path, str, str]] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise DataError(
                f"data path {str(raw)!r} does not exist; expected a text file, "
                "a folder of text files, or a .jsonl file"
            )
        if path.is_dir():
            domain = path.resolve().name or "data"
            files = sorted(
                (
                    p
                    for p in path.rglob("*")
                    if p.is_file()
                    and not any(part.startswith(".") for part in p.relative_to(path).parts)
                ),
                key=lambda p: p.relative_to(path).as_posix(),
            )
            if not files:
                raise DataError(f"data folder {str(raw)!r} contains no files")
            found += [(p, domain, f"{domain}/{p.relative_to(path).as_posix()}") for p in files]
        elif path.is_file():
            found.append((path, path.stem or path.name, path.name))
        else:
            raise DataError(f"data path {str(raw)!r} is neither a regular file nor a folder")
    return _once_each(found)


def _once_each(found: list[tuple[Path, str, str]]) -> list[tuple[Path, str, str]]:
    """`found` with each file once, by resolved path: a symlink to a file already read (or
    a path given twice) would otherwise weigh that text double (22% of Debian's
    /usr/share/common-licenses are such links). The first occurrence is kept; the skipped
    ones are logged."""
    seen: dict[Path, str] = {}
    kept: list[tuple[Path, str, str]] = []
    skipped: list[str] = []
    for path, domain, label in found:
        real = path.resolve()
        if real in seen:
            skipped.append(f"{label} (= {seen[real]})")
            continue
        seen[real] = label
        kept.append((path, domain, label))
    if skipped:
        logger.info("data: read %d file(s) once each; skipped %d that are the same file as another (symlinks or "
                    "repeated paths): %s%s", len(kept), len(skipped), ", ".join(skipped[:5]),
                    f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
    return kept


def _decode(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read data file {str(path)!r}: {exc.strerror or exc}") from exc
    if b"\x00" in data:
        raise DataError(
            f"data file {str(path)!r} looks binary (it contains NUL bytes); "
            "expected UTF-8 text or JSONL"
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"data file {str(path)!r} is not UTF-8 text: byte 0x{data[exc.start]:02x} at offset "
            f"{exc.start} cannot be decoded; convert it first (e.g. `iconv -t UTF-8`)"
        ) from exc
    if not text.strip():
        raise DataError(f"data file {str(path)!r} is empty")
    # Windows line ends would otherwise double the newline tokens of such files.
    return text.replace("\r\n", "\n")


def _check_domain(value: object, where: str) -> str:
    if not isinstance(value, str) or not value.strip() or any(c in value for c in "\n\r\t\0"):
        raise DataError(f"{where}: 'domain' must be a non-empty one-line string, got {value!r}")
    return value.strip()


def _jsonl_documents(path: Path, text: str, default_domain: str, label: str) -> Iterator[Document]:
    empty = 0
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{where}: not valid JSON ({exc.msg}); expected one JSON object "
                "per line with a 'text' field"
            ) from exc
        if not isinstance(record, dict):
            raise DataError(
                f"{where}: expected a JSON object with a 'text' field, got {type(record).__name__}"
            )
        if "text" not in record:
            raise DataError(
                f"{where}: record has no 'text' field (it has: "
                f"{', '.join(map(repr, record)) or 'no fields'})"
            )
        body = record["text"]
        if not isinstance(body, str):
            raise DataError(f"{where}: 'text' must be a string, got {type(body).__name__}")
        domain = _check_domain(record["domain"], where) if "domain" in record else default_domain
        if not body.strip():
            empty += 1
            continue
        yield Document(text=body, domain=domain, source=f"{label}:{lineno}")
    if empty:
        logger.warning("%s: skipped %d records with empty 'text'", path, empty)


def load_user_data(paths: Sequence[str | Path]) -> list[Document]:
    """Documents from text files, folders of them, and JSONL files.

    * a text file (any name) is UTF-8 text, cut at paragraph breaks into
      documents of at most `USER_DOC_CHARS` characters;
    * a `.jsonl`/`.ndjson` file has one JSON object per line with a string
      `text` and an optional `domain`;
    * the domain defaults to the file's name without suffix, or for files found
      in a folder, to the folder's name.

    Raises `DataError`, naming the path (and line for JSONL), for a missing
    path, an empty folder or file, undecodable or binary content, and malformed
    records.
    """
    docs: list[Document] = []
    for path, domain, label in user_data_files(paths):
        text = _decode(path)
        if path.suffix.lower() in JSONL_SUFFIXES:
            found = list(_jsonl_documents(path, text, domain, label))
            if not found:
                raise DataError(f"data file {str(path)!r} has no records with non-empty 'text'")
            docs += found
        else:
            pieces = chunk_text(text, USER_DOC_CHARS)
            docs += [
                Document(text=p + "\n", domain=domain, source=f"{label}#{i}")
                for i, p in enumerate(pieces)
            ]
    return docs


# ---------------------------------------------------------------- split


def split_documents(
    docs: Sequence[Document], val_fraction: float = 0.05
) -> tuple[list[Document], list[Document]]:
    """(train, val) by a stable hash of each document's domain and text.

    A document is in validation when `blake2b(domain, text) / 2**64 < val_fraction`,
    so the split does not depend on order, machine or run, and identical
    documents always land on the same side (no duplicate leaks across).

    Every domain gets at least one validation and one training document: if the
    hash gives a domain none, its lowest-hash document moves to validation (or
    highest-hash to training). A domain with a single document has that
    document cut at a line end, the last `val_fraction` going to validation.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
    threshold = int(val_fraction * 2**64)
    by_domain: dict[str, list[int]] = {}
    for i, doc in enumerate(docs):
        by_domain.setdefault(doc.domain, []).append(i)
    hashes = [stable_hash(doc.domain, doc.text) for doc in docs]
    in_val = [h < threshold for h in hashes]
    single: set[int] = set()
    for idx in by_domain.values():
        if len(idx) == 1:
            single.add(idx[0])
            continue
        if not any(in_val[i] for i in idx):
            in_val[min(idx, key=lambda i: (hashes[i], i))] = True
        elif all(in_val[i] for i in idx):
            in_val[max(idx, key=lambda i: (hashes[i], -i))] = False
    train: list[Document] = []
    val: list[Document] = []
    for i, doc in enumerate(docs):
        if i in single:
            head, tail = _cut_for_val(doc, val_fraction)
            if head is not None:
                train.append(head)
            val.append(tail)
        else:
            (val if in_val[i] else train).append(doc)
    return train, val


def _cut_for_val(doc: Document, val_fraction: float) -> tuple[Document | None, Document]:
    n = len(doc.text)
    if n < 2:
        logger.warning(
            "domain %r has one %d-character document; it is used for validation only", doc.domain, n
        )
        return None, doc
    target = min(n - 1, max(1, int(n * (1.0 - val_fraction))))
    cut = doc.text.rfind("\n", 0, target) + 1  # just after a line end, if there is one
    if cut <= 0 or n - cut < max(1, (n - target) // 2):
        cut = target
    return (
        Document(text=doc.text[:cut], domain=doc.domain, source=f"{doc.source} (train part)"),
        Document(text=doc.text[cut:], domain=doc.domain, source=f"{doc.source} (val part)"),
    )
