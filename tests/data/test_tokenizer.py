"""Byte-level BPE: special ids, lossless round trip, determinism, file I/O."""

from __future__ import annotations

from pathlib import Path

import pytest

from moelab.data.corpus import Document
from moelab.data.tokenizer import (
    EOS_ID,
    EOS_TOKEN,
    PAD_ID,
    PAD_TOKEN,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)
from moelab.errors import ConfigError, DataError

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. " * 20,
    "Question: What is 12 + 30?\nAnswer:\n12 + 30 = 42\n" * 10,
    '{"id": 1, "name": "Ada Lovelace", "city": "London"}\n' * 10,
    "Größe, naïve café; Ελληνικά; 日本語のテキスト; emoji 🙂\n" * 5,
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([Document(text=t, domain="d", source="s") for t in TEXTS], 400, seed=0)


def test_special_tokens_have_fixed_ids(tokenizer) -> None:
    assert tokenizer.token_to_id(EOS_TOKEN) == EOS_ID == 0
    assert tokenizer.token_to_id(PAD_TOKEN) == PAD_ID == 1
    assert tokenizer.get_vocab_size() <= 400


@pytest.mark.parametrize(
    "text",
    [
        "",
        "  leading spaces\n\ttabs\r\n",
        "unseen: Ж ש ☃ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \x00\x7f",
        "x = {'a': [1, 2]}  # c",
    ],
)
def test_byte_level_round_trip_is_lossless(tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert EOS_ID not in ids  # a literal "<|endoftext|>" is never produced from ordinary text


def test_training_is_deterministic(tokenizer) -> None:
    again = train_tokenizer(TEXTS, 400, seed=0)  # plain strings work too
    assert again.to_str(pretty=True) == tokenizer.to_str(pretty=True)


def test_save_and_load_round_trip(tokenizer, tmp_path: Path) -> None:
    path = save_tokenizer(tokenizer, tmp_path / "tok" / "tokenizer.json")
    loaded = load_tokenizer(path.parent)  # a folder works too
    assert loaded.to_str(pretty=True) == path.read_text(encoding="utf-8")
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no temp files left


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not a valid tokenizer.json"):
        load_tokenizer(bad)


@pytest.mark.parametrize("vocab_size", [0, 100, 257, 300.0])
def test_vocab_size_is_validated(vocab_size) -> None:
    with pytest.raises(ConfigError, match="vocab_size"):
        train_tokenizer(TEXTS, vocab_size)


def test_empty_training_text_is_an_error() -> None:
    with pytest.raises(DataError, match="empty"):
        train_tokenizer(["", "  "], 300)


def test_sample_when_text_exceeds_limit_depends_on_seed() -> None:
    many = [f"document number {i} with words {i * 31 % 97}\n" for i in range(400)]
    a = train_tokenizer(many, 300, seed=0, max_train_chars=2000)
    b = train_tokenizer(many, 300, seed=0, max_train_chars=2000)
    c = train_tokenizer(many, 300, seed=1, max_train_chars=2000)
    assert a.to_str() == b.to_str() != c.to_str()
