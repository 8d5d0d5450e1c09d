"""`prepare_data`: corpus -> split -> tokenizer -> token arrays, cached on disk.

Everything is keyed by a fingerprint of the inputs (the corpus recipe and its
version, vocab size, seed, split fraction, Python version for the stdlib
domains, and the bytes of user and extra files), so a second call with the same
inputs loads the cache instead of rebuilding; a change to any input builds a
new entry beside the old one. Cache layout (one folder per fingerprint):

    <cache_dir>/<fingerprint[:16]>/
        tokenizer.json          byte-level BPE trained on the train split
        train-000.npy ...       one flat token array per domain (uint16 if the vocab fits)
        val-000.npy ...
        meta.json               domains, file names, stats, versions; written last

`meta.json` is written last and every file atomically, so an interrupted build
leaves no entry that looks complete; the next call simply rebuilds it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from tokenizers import Tokenizer

from moelab.data import extras
from moelab.data.batching import TokenBatcher, batches, val_batches
from moelab.data.corpus import (
    DEFAULT_MAX_CHARS_PER_DOMAIN,
    Document,
    build_default_corpus,
    load_user_data,
    split_documents,
    user_data_files,
)
from moelab.data.tokenizer import (
    DEFAULT_VOCAB_SIZE,
    EOS_ID,
    EOS_STRINGS,
    MIN_VOCAB_SIZE,
    PAD_ID,
    end_token_ids,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)
from moelab.errors import ConfigError, DataError
from moelab.io import atomic_path, atomic_write_json

__all__ = ["DataConfig", "PreparedData", "TokenBatcher", "batches", "prepare_data", "val_batches"]

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path("runs/cache/data")
# Bump when the corpus recipe, split or encoding changes, so old caches are not reused.
CACHE_FORMAT_VERSION = 2

Stats = dict[str, dict[str, dict[str, int]]]  # split -> domain -> {"docs", "chars", "tokens"}


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """What goes into the prepared data; every field is part of the cache key.

    `include_default_corpus=None` means: the default corpus unless `data_paths`
    are given (user data replaces it); `True` mixes both. `tokenizer` (a tokenizer.json)
    encodes the data instead of a BPE trained on it (`vocab_size` then does not apply):
    fine-tuning must see its model's own token ids. It is keyed by its bytes.
    """

    data_paths: tuple[str, ...] = ()
    include_default_corpus: bool | None = None
    extra_domains: bool = False
    max_chars_per_domain: int | None = DEFAULT_MAX_CHARS_PER_DOMAIN
    vocab_size: int = DEFAULT_VOCAB_SIZE
    val_fraction: float = 0.05
    seed: int = 0
    tokenizer: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.data_paths, str | Path):
            raise ConfigError(
                f"data_paths must be a sequence of paths, got the single path "
                f"{str(self.data_paths)!r}; wrap it in a list"
            )
        object.__setattr__(self, "data_paths", tuple(str(p) for p in self.data_paths))
        if self.tokenizer is None and (  # a given tokenizer has its own vocabulary
            not isinstance(self.vocab_size, int)
            or not MIN_VOCAB_SIZE <= self.vocab_size <= 2**31 - 1
        ):
            raise ConfigError(
                f"vocab_size must be an integer >= {MIN_VOCAB_SIZE}, got {self.vocab_size!r}"
            )
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.max_chars_per_domain is not None and (
            not isinstance(self.max_chars_per_domain, int) or self.max_chars_per_domain < 256
        ):
            raise ConfigError(
                f"max_chars_per_domain must be None or an integer >= 256, "
                f"got {self.max_chars_per_domain!r}"
            )
        if self.tokenizer is not None:
            object.__setattr__(self, "tokenizer", str(self.tokenizer))
            if not Path(self.tokenizer).is_file():
                raise ConfigError(f"tokenizer {self.tokenizer!r} is not a file (expected a tokenizer.json)")
        if not self.uses_default_corpus and not self.data_paths and not self.extra_domains:
            raise ConfigError("include_default_corpus=False needs data_paths or extra_domains")

    @property
    def uses_default_corpus(self) -> bool:
        if self.include_default_corpus is None:
            return not self.data_paths
        return self.include_default_corpus


@dataclass(frozen=True)
class PreparedData:
    """The tokenizer and per-domain token arrays of one prepared corpus.

    `train[d]`/`val[d]` are flat token arrays (documents each followed by
    `eos_id`), memory-mapped read-only from the cache. `stats[split][domain]`
    has `docs`, `chars` and `tokens`.
    """

    cache_dir: Path
    tokenizer_path: Path
    tokenizer: Tokenizer
    vocab_size: int
    train: dict[str, np.ndarray]
    val: dict[str, np.ndarray]
    domains: list[str]
    stats: Stats
    fingerprint: str
    eos_id: int = EOS_ID
    pad_id: int = PAD_ID
    from_cache: bool = False
    meta: dict[str, Any] = field(default_factory=dict, repr=False)


def _file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(config: DataConfig, *, extras_root: Path = Path("/")) -> str:
    """Hex key of everything that determines the prepared data.

    User and extra files are keyed by their names and bytes (not paths or
    mtimes), so moving a folder keeps its cache and editing a file does not.
    The stdlib domains are keyed by Python version: the same version ships the
    same stdlib source.
    """
    key: dict[str, Any] = {
        "format": CACHE_FORMAT_VERSION,
        "config": {k: v for k, v in dataclasses.asdict(config).items() if k not in ("data_paths", "tokenizer")},
        "python": platform.python_version() if config.uses_default_corpus else None,
        "tokenizers": tokenizers.__version__,
    }
    if config.tokenizer is not None:
        key["tokenizer"] = _file_digest(Path(config.tokenizer))
    if config.data_paths:
        key["user_files"] = [
            (label, domain, _file_digest(path))
            for path, domain, label in user_data_files(config.data_paths)
        ]
    if config.extra_domains:
        key["extra_files"] = [
            (label, _file_digest(path)) for label, path in extras.multilingual_files(extras_root)
        ]
    blob = json.dumps(key, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


def _collect_documents(config: DataConfig, extras_root: Path) -> list[Document]:
    docs: list[Document] = []
    if config.uses_default_corpus or config.extra_domains:
        docs = build_default_corpus(
            seed=config.seed,
            max_chars_per_domain=config.max_chars_per_domain,
            extra_domains=config.extra_domains,
            extras_root=extras_root,
        )
        if not config.uses_default_corpus:
            docs = [d for d in docs if d.domain == "multilingual"]
    if config.data_paths:
        docs += load_user_data(config.data_paths)
    if not docs:
        raise DataError(
            "no documents to prepare (the extra domains were requested but none "
            "is installed, and no other data was given)"
        )
    return docs


def _encode(tokenizer: Tokenizer, docs: list[Document], dtype: np.dtype, eos_id: int = EOS_ID) -> np.ndarray:
    """Token ids of `docs`, each document followed by EOS, as one flat array."""
    if not docs:
        return np.zeros(0, dtype=dtype)
    # A literal "<|endoftext|>" in a document is text, not a document boundary:
    # without this flag the tokenizer would turn it into EOS (id 0).
    previous = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = True
    try:
        encodings = tokenizer.encode_batch_fast([d.text for d in docs], add_special_tokens=False)
    finally:
        tokenizer.encode_special_tokens = previous
    parts: list[np.ndarray] = []
    eos = np.array([eos_id], dtype=dtype)
    for enc in encodings:
        parts.append(np.asarray(enc.ids, dtype=dtype))
        parts.append(eos)
    return np.concatenate(parts)


def _corpus_digest(docs: Sequence[Document]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for d in docs:
        for part in (d.domain, d.text):
            data = part.encode("utf-8")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
    return h.hexdigest()


def _build(entry: Path, config: DataConfig, fp: str, extras_root: Path) -> None:
    start = time.perf_counter()
    docs = _collect_documents(config, extras_root)
    train_docs, val_docs = split_documents(docs, config.val_fraction)
    t_corpus = time.perf_counter()
    eos_id = EOS_ID
    if config.tokenizer is None:
        tokenizer = train_tokenizer(train_docs, config.vocab_size, seed=config.seed)
    else:  # a model's own tokenizer (fine-tuning): its end-of-text token separates documents
        tokenizer = load_tokenizer(config.tokenizer)
        ends = end_token_ids(tokenizer)
        if not ends:
            raise DataError(f"tokenizer {config.tokenizer}: no end-of-text token ({', '.join(EOS_STRINGS)}) to "
                            "separate documents")
        eos_id = ends[0]
    save_tokenizer(tokenizer, entry / "tokenizer.json")
    t_tok = time.perf_counter()
    vocab_size = tokenizer.get_vocab_size()
    dtype = np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.int32)
    domains = list(dict.fromkeys(d.domain for d in docs))
    files: dict[str, dict[str, str]] = {}
    stats: Stats = {"train": {}, "val": {}}
    for i, domain in enumerate(domains):
        files[domain] = {}
        for split, split_docs in (("train", train_docs), ("val", val_docs)):
            mine = [d for d in split_docs if d.domain == domain]
            tokens = _encode(tokenizer, mine, dtype, eos_id)
            name = f"{split}-{i:03d}.npy"
            with atomic_path(entry / name) as tmp, open(tmp, "wb") as f:
                np.save(f, tokens, allow_pickle=False)
            files[domain][split] = name
            stats[split][domain] = {
                "docs": len(mine),
                "chars": sum(len(d.text) for d in mine),
                "tokens": int(tokens.size),
            }
    t_enc = time.perf_counter()
    meta = {
        "format": CACHE_FORMAT_VERSION,
        "fingerprint": fp,
        "config": dataclasses.asdict(config),
        "python_version": platform.python_version(),
        "python_build": sys.version,
        "tokenizers_version": tokenizers.__version__,
        "numpy_version": np.__version__,
        "domains": domains,
        "files": files,
        "vocab_size": vocab_size,
        "eos_id": eos_id,
        "pad_id": PAD_ID,
        "dtype": dtype.name,
        "stats": stats,
        "corpus_digest": _corpus_digest(docs),
        "build_seconds": {
            "corpus": round(t_corpus - start, 3),
            "tokenizer": round(t_tok - t_corpus, 3),
            "encode": round(t_enc - t_tok, 3),
        },
    }
    atomic_write_json(entry / "meta.json", meta)  # last: marks the entry complete
    logger.info(
        "prepared data in %s (%.1f s: corpus %.1f, tokenizer %.1f, encode %.1f)",
        entry,
        t_enc - start,
        t_corpus - start,
        t_tok - t_corpus,
        t_enc - t_tok,
    )


def _load(entry: Path, fp: str, from_cache: bool) -> PreparedData:
    meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
    if meta.get("format") != CACHE_FORMAT_VERSION or meta.get("fingerprint") != fp:
        raise DataError(f"cache entry {entry} does not match (format or fingerprint differs)")
    tokenizer_path = entry / "tokenizer.json"
    arrays: dict[str, dict[str, np.ndarray]] = {"train": {}, "val": {}}
    for domain in meta["domains"]:
        for split in ("train", "val"):
            arrays[split][domain] = np.load(
                entry / meta["files"][domain][split], mmap_mode="r", allow_pickle=False
            )
    return PreparedData(
        cache_dir=entry,
        tokenizer_path=tokenizer_path,
        tokenizer=load_tokenizer(tokenizer_path),
        vocab_size=int(meta["vocab_size"]),
        train=arrays["train"],
        val=arrays["val"],
        domains=list(meta["domains"]),
        stats=meta["stats"],
        fingerprint=fp,
        eos_id=int(meta["eos_id"]),
        pad_id=int(meta["pad_id"]),
        from_cache=from_cache,
        meta=meta,
    )


def load_cache_entry(entry: str | Path) -> PreparedData:
    """Load one prepared-data cache entry (a folder holding ``meta.json``, ``tokenizer.json``
    and the token arrays) as it is, without checking it against this machine.

    `prepare_data` keys its cache by a fingerprint that includes the Python version (the
    default corpus is the standard library's source), so another machine builds different
    data. Copying an entry and loading it with this function trains on the very same tokens
    elsewhere, e.g. a sweep on a GPU machine for an experiment run on a CPU.
    """
    entry = Path(entry)
    meta_path = entry / "meta.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{entry} is not a prepared-data cache entry: {meta_path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{meta_path} is unreadable or not JSON: {e}") from None
    fp = meta.get("fingerprint") if isinstance(meta, dict) else None
    if not isinstance(fp, str):
        raise DataError(f"{meta_path} has no 'fingerprint' string; expected a moelab prepared-data meta.json")
    try:
        return _load(entry, fp, from_cache=True)
    except (OSError, KeyError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"cache entry {entry} is incomplete or corrupt: {type(e).__name__}: {e}") from None


def prepare_data(
    cache_dir: str | Path | None = None,
    *,
    data_paths: Sequence[str | Path] | None = None,
    extra_domains: bool = False,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    seed: int = 0,
    max_chars_per_domain: int | None = DEFAULT_MAX_CHARS_PER_DOMAIN,
    include_default_corpus: bool | None = None,
    val_fraction: float = 0.05,
    extras_root: Path = Path("/"),
    tokenizer: str | Path | None = None,
) -> PreparedData:
    """Build (or load from cache) the corpus, tokenizer and token arrays.

    `cache_dir` defaults to `runs/cache/data` under the current directory.
    `data_paths` are text files, folders or `.jsonl` files (see
    `load_user_data`); given alone they replace the default corpus. The second
    call with the same inputs only memory-maps the cached arrays. `tokenizer` (a
    tokenizer.json) encodes the data instead of a BPE trained on it (`DataConfig`).
    """
    if isinstance(data_paths, str | Path):
        data_paths = [data_paths]
    config = DataConfig(
        data_paths=tuple(str(p) for p in data_paths or ()),
        include_default_corpus=include_default_corpus,
        extra_domains=extra_domains,
        max_chars_per_domain=max_chars_per_domain,
        vocab_size=vocab_size,
        val_fraction=val_fraction,
        seed=seed,
        tokenizer=str(tokenizer) if tokenizer is not None else None,
    )
    return prepare_data_from_config(config, cache_dir, extras_root=extras_root)


def prepare_data_from_config(
    config: DataConfig, cache_dir: str | Path | None = None, *, extras_root: Path = Path("/")
) -> PreparedData:
    """`prepare_data` for a ready-made `DataConfig`."""
    cache_root = Path(DEFAULT_CACHE_DIR if cache_dir is None else cache_dir)
    fp = fingerprint(config, extras_root=extras_root)
    entry = cache_root / fp[:16]
    if (entry / "meta.json").is_file():
        try:
            data = _load(entry, fp, from_cache=True)
            logger.info("loaded prepared data from cache %s", entry)
            return data
        except (OSError, ValueError, KeyError, DataError) as exc:
            logger.warning("cache entry %s is unusable (%s); rebuilding it", entry, exc)
            (entry / "meta.json").unlink(missing_ok=True)
    _build(entry, config, fp, extras_root)
    return _load(entry, fp, from_cache=False)
