"""prepare_data: byte-identical rebuilds, cache hits, arrays; batches by step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from moelab.data import (
    DEFAULT_DOMAINS,
    EOS_ID,
    PreparedData,
    TokenBatcher,
    batches,
    load_cache_entry,
    prepare_data,
    val_batches,
)
from moelab.data.corpus import build_default_corpus, split_documents
from moelab.errors import ConfigError, DataError

from .conftest import SMALL


def _entry_bytes(entry: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(entry.iterdir()) if p.name != "meta.json"}


def test_fresh_builds_are_byte_identical(small_data: PreparedData, tmp_path: Path) -> None:
    other = prepare_data(tmp_path / "b", **SMALL)
    assert not other.from_cache and other.fingerprint == small_data.fingerprint
    assert _entry_bytes(other.cache_dir) == _entry_bytes(small_data.cache_dir)
    assert other.meta["corpus_digest"] == small_data.meta["corpus_digest"]
    assert other.tokenizer_path.read_bytes() == small_data.tokenizer_path.read_bytes()


def test_build_in_another_process_is_byte_identical(
    small_data: PreparedData, tmp_path: Path
) -> None:
    """Another interpreter, another hash seed, another cwd: same bytes."""
    code = (
        "import sys; from moelab.data import prepare_data; "
        f"d = prepare_data(sys.argv[1], **{SMALL!r}); print(d.cache_dir)"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "c")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    entry = Path(out.stdout.strip().splitlines()[-1])
    assert _entry_bytes(entry) == _entry_bytes(small_data.cache_dir)


def test_second_call_loads_from_cache(small_data: PreparedData, small_cache: Path) -> None:
    stamp = small_data.tokenizer_path.stat().st_mtime_ns
    start = time.perf_counter()
    again = prepare_data(small_cache, **SMALL)
    assert time.perf_counter() - start < 1.0
    assert again.from_cache and again.cache_dir == small_data.cache_dir
    assert again.tokenizer_path.stat().st_mtime_ns == stamp  # not retrained
    for split in ("train", "val"):
        for domain in again.domains:
            np.testing.assert_array_equal(
                getattr(again, split)[domain], getattr(small_data, split)[domain]
            )


def test_changed_inputs_get_their_own_entry(small_data: PreparedData, small_cache: Path) -> None:
    other = prepare_data(small_cache, **{**SMALL, "vocab_size": 300})
    assert not other.from_cache and other.cache_dir != small_data.cache_dir
    assert other.cache_dir.parent == small_data.cache_dir.parent
    assert other.vocab_size == 300


def test_unusable_cache_entry_is_rebuilt(tmp_path: Path) -> None:
    args = {**SMALL, "max_chars_per_domain": 5_000, "vocab_size": 300}
    first = prepare_data(tmp_path, **args)
    (first.cache_dir / "meta.json").write_text("{truncated")
    rebuilt = prepare_data(tmp_path, **args)
    assert not rebuilt.from_cache
    assert json.loads((rebuilt.cache_dir / "meta.json").read_text())["fingerprint"]


def test_copied_cache_entry_loads_as_is(small_data: PreparedData, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "elsewhere"
    shutil.copytree(small_data.cache_dir, copy)
    loaded = load_cache_entry(copy)
    assert loaded.fingerprint == small_data.fingerprint and loaded.domains == small_data.domains
    for split in ("train", "val"):
        for domain in loaded.domains:
            np.testing.assert_array_equal(getattr(loaded, split)[domain], getattr(small_data, split)[domain])
    with pytest.raises(DataError, match="not a prepared-data cache entry"):
        load_cache_entry(tmp_path / "missing")
    (copy / small_data.meta["files"][small_data.domains[0]]["train"]).unlink()
    with pytest.raises(DataError, match="incomplete or corrupt"):
        load_cache_entry(copy)
    (copy / "meta.json").write_text("{truncated")
    with pytest.raises(DataError, match="not JSON"):
        load_cache_entry(copy)


def test_arrays_hold_every_domain_split_by_eos(small_data: PreparedData) -> None:
    assert small_data.domains == list(DEFAULT_DOMAINS)
    assert small_data.tokenizer.get_vocab_size() == small_data.vocab_size == 512
    docs = build_default_corpus(seed=0, max_chars_per_domain=SMALL["max_chars_per_domain"])
    train_docs, val_docs = split_documents(docs)
    for split, split_docs in (("train", train_docs), ("val", val_docs)):
        for domain in DEFAULT_DOMAINS:
            tokens = getattr(small_data, split)[domain]
            mine = [d for d in split_docs if d.domain == domain]
            assert tokens.dtype == np.uint16 and len(tokens) > 0 and tokens[-1] == EOS_ID
            stats = small_data.stats[split][domain]
            assert stats == {
                "docs": len(mine),
                "chars": sum(len(d.text) for d in mine),
                "tokens": len(tokens),
            }
            assert int((tokens == EOS_ID).sum()) == len(mine)  # one EOS after each document
            first = np.asarray(tokens[: int(np.argmax(tokens == EOS_ID))]).tolist()
            assert small_data.tokenizer.decode(first) == mine[0].text


def test_config_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="vocab_size"):
        prepare_data(tmp_path, vocab_size=10)
    with pytest.raises(ConfigError, match="val_fraction"):
        prepare_data(tmp_path, val_fraction=0.0)
    with pytest.raises(ConfigError, match="max_chars_per_domain"):
        prepare_data(tmp_path, max_chars_per_domain=10)
    with pytest.raises(ConfigError, match="seed"):
        prepare_data(tmp_path, seed=-1)


# ---------------------------------------------------------------- batches


def _toy() -> dict[str, np.ndarray]:
    # Each domain owns a token range, so a row's domain can be read off its values.
    return {
        "a": np.arange(0, 1000, dtype=np.uint16),
        "b": np.arange(1000, 1300, dtype=np.uint16),
        "c": np.arange(2000, 2010, dtype=np.uint16),  # too short for T = 16
    }


def test_batches_are_a_function_of_seed_and_step() -> None:
    batcher = TokenBatcher(_toy(), 8, 16, seed=3)
    assert batcher.domains == ["a", "b"]
    x, y = batcher.get_batch(5)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    torch.testing.assert_close(y[:, :-1], x[:, 1:])  # targets are inputs shifted by one
    torch.testing.assert_close(y[:, -1], x[:, -1] + 1)  # toy arrays are consecutive
    again = TokenBatcher(_toy(), 8, 16, seed=3)
    torch.testing.assert_close(again.get_batch(5), (x, y))
    # A resumed run starting at step 5 sees what the original saw at step 5.
    resumed = next(batches(_toy(), 8, 16, seed=3, start_step=5))
    torch.testing.assert_close(resumed, (x, y))
    assert not torch.equal(batcher.get_batch(6)[0], x)
    assert not torch.equal(TokenBatcher(_toy(), 8, 16, seed=4).get_batch(5)[0], x)


def test_domain_ids_match_rows() -> None:
    batcher = TokenBatcher(_toy(), 64, 16, seed=0)
    for step in range(3):
        x, _ = batcher.get_batch(step)
        ids = batcher.domain_ids(step)
        torch.testing.assert_close(ids, (x[:, 0] >= 1000).long())


@pytest.mark.parametrize(
    ("mix", "share_a"),
    [("proportional", (1000 - 16) / (1000 - 16 + 300 - 16)), ("uniform", 0.5), ({"a": 1.0}, 1.0)],
)
def test_mix_sets_domain_frequencies(mix, share_a: float) -> None:
    batcher = TokenBatcher(_toy(), 256, 16, seed=0, mix=mix)
    ids = torch.cat([batcher.domain_ids(s) for s in range(20)])
    assert abs((ids == 0).float().mean().item() - share_a) < 0.03


def test_batcher_errors() -> None:
    with pytest.raises(DataError, match="seq_len \\+ 1"):
        TokenBatcher({"c": np.arange(10)}, 2, 16)
    with pytest.raises(ConfigError, match="mix"):
        TokenBatcher(_toy(), 2, 16, mix={"zzz": 1.0})
    with pytest.raises(ConfigError, match="mix"):
        TokenBatcher(_toy(), 2, 16, mix="random")
    with pytest.raises(ConfigError, match="batch_size"):
        TokenBatcher(_toy(), 0, 16)


def test_val_batches_are_fixed_and_cover_every_domain(small_data: PreparedData) -> None:
    val = val_batches(small_data.val, 4, 64, max_batches_per_domain=2)
    assert list(val) == small_data.domains
    for batch_list in val.values():
        assert 1 <= len(batch_list) <= 2
        for x, y in batch_list:
            assert x.shape[1] == 64 and x.shape == y.shape
            torch.testing.assert_close(y[:, :-1], x[:, 1:])
    again = val_batches(small_data.val, 4, 64, max_batches_per_domain=2)
    torch.testing.assert_close(again, val)


def test_val_batches_spread_windows_and_keep_short_domains() -> None:
    val = val_batches(_toy(), 4, 16, max_batches_per_domain=1)
    ((xa, _),) = val["a"]
    assert xa[0, 0] == 0 and xa[-1, 0] == (999 // 16 - 1) * 16  # first and last window
    ((xc, yc),) = val["c"]
    assert xc.shape == (1, 9) and yc[0, -1] == 2009  # a short domain gives one shorter window
    full = val_batches(_toy(), 4, 16, max_batches_per_domain=None)
    assert sum(len(x) for x, _ in full["a"]) == 999 // 16
