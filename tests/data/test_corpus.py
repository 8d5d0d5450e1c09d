"""The default corpus: domains, caps, determinism, generated content, split."""

from __future__ import annotations

import csv
import gzip
import io
import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moelab.data import stdlib_sources
from moelab.data.corpus import (
    DEFAULT_DOMAINS,
    Document,
    build_default_corpus,
    split_documents,
)
from moelab.data.extras import multilingual_files, multilingual_texts
from moelab.data.stdlib_sources import docstrings_and_comments, stdlib_python_files
from moelab.data.synthetic import data_records, math_problems
from moelab.data.text import chunk_text, stable_hash
from moelab.errors import ConfigError

CAP = 30_000


@pytest.fixture(scope="module")
def corpus() -> list[Document]:
    return build_default_corpus(seed=0, max_chars_per_domain=CAP)


def test_every_default_domain_is_present_and_capped(corpus: list[Document]) -> None:
    chars = Counter()
    for doc in corpus:
        chars[doc.domain] += len(doc.text)
        assert doc.text.strip() and doc.source
    assert set(chars) == set(DEFAULT_DOMAINS)
    for domain in DEFAULT_DOMAINS:
        # The cap is exact; the last document is cut at a line end, so nearly full.
        assert CAP - 2_000 < chars[domain] <= CAP, domain


def test_default_corpus_is_reproducible(corpus: list[Document]) -> None:
    assert build_default_corpus(seed=0, max_chars_per_domain=CAP) == corpus


def test_seed_changes_only_generated_domains(corpus: list[Document]) -> None:
    other = build_default_corpus(seed=1, max_chars_per_domain=CAP)
    for domain in DEFAULT_DOMAINS:
        same = [d for d in corpus if d.domain == domain] == [d for d in other if d.domain == domain]
        assert same == (domain in ("code", "prose")), domain


def test_code_and_prose_come_from_disjoint_stdlib_files(corpus: list[Document]) -> None:
    code_half, prose_half = ({name for name, _ in half} for half in stdlib_sources._halves(None))
    assert not code_half & prose_half
    assert code_half | prose_half == {name for name, _ in stdlib_python_files()}
    # About half each: the split is by hash, not by folder.
    assert 0.4 < len(code_half) / (len(code_half) + len(prose_half)) < 0.6
    for doc in corpus:
        if doc.domain == "code":
            assert doc.source.split(":", 1)[1].removesuffix(" (truncated)") in code_half


def test_stdlib_file_names_are_relative_and_exclude_build_specific_files() -> None:
    names = [name for name, _ in stdlib_python_files()]
    assert names == sorted(names) and len(names) > 300
    for name in names:
        assert not name.startswith("/")
        parts = name.split("/")
        assert not {"site-packages", "test", "tests", "__pycache__"} & set(parts), name
        assert not parts[-1].startswith("_sysconfigdata"), name


def test_docstrings_and_comments_skip_hashes_inside_strings() -> None:
    source = '''"""Module docstring with enough words in it."""

# This comment explains a choice in a few words.
x = """
# not a comment, inside a string literal
"""

def f():
    """Function docstring says what it does."""
    # noqa
'''
    blocks = docstrings_and_comments(source)
    assert blocks == [
        "Module docstring with enough words in it.",
        "This comment explains a choice in a few words.",
        "Function docstring says what it does.",
    ]


def _eval_side(expr: str, var: str, value: int) -> float:
    return eval(expr.replace(var, f"({value})"), {"__builtins__": {}})


def test_generated_math_answers_are_correct() -> None:
    checked = Counter()
    for text, source in _take(math_problems(seed=3), 3000):
        answer = text.rsplit("\n", 2)[-2]
        if m := re.match(r"Question: Solve (.+) = (.+) for (\w)\.", text):
            lhs, rhs, var = m.groups()
            value = int(re.match(rf"So {var} = (-?\d+)\.", answer).group(1))
            assert _eval_side(lhs, var, value) == _eval_side(rhs, var, value), text
            checked["linear"] += 1
        elif m := re.match(r"Question: What is (-?\d+) \+ \(?(-?\d+)\)?\?", text):
            assert answer == f"The answer is {int(m[1]) + int(m[2])}.", text
            checked["add"] += 1
        elif m := re.match(r"Question: Let \w\((\w)\) = (.+)\. What is \w\((-?\d+)\)\?", text):
            var, poly, x = m[1], m[2], int(m[3])
            assert answer == f"The answer is {_eval_side(poly, var, x)}.", text
            checked["poly"] += 1
        assert source.startswith("math:")
    assert min(checked.values()) > 20, checked


def _take(stream, n):
    return [item for _, item in zip(range(n), stream, strict=False)]


def test_generated_records_parse_and_are_consistent() -> None:
    formats = Counter()
    for text, source in _take(data_records(seed=0), 300):
        fmt = source.split(":")[1].rsplit(".", 1)[1]
        formats[fmt] += 1
        if fmt == "json":
            (records,) = json.loads(text).values()
        elif fmt == "jsonl":
            records = [json.loads(line) for line in text.splitlines()]
        else:
            rows = list(csv.reader(io.StringIO(text)))
            assert len({len(r) for r in rows}) == 1
            records = []
        for rec in records:
            if "lines" in rec:  # orders add up to the cent
                assert round(sum(x["subtotal"] for x in rec["lines"]), 2) == rec["total"]
    assert set(formats) == {"json", "jsonl", "csv"}


def test_extra_domain_is_optional(tmp_path: Path) -> None:
    docs = build_default_corpus(max_chars_per_domain=1000, extra_domains=True, extras_root=tmp_path)
    assert {d.domain for d in docs} == set(DEFAULT_DOMAINS)


def test_extra_domain_reads_debian_reference_and_fortunes(tmp_path: Path) -> None:
    ref = tmp_path / "usr/share/debian-reference"
    ref.mkdir(parents=True)
    for lang, para in [("de", "Ein Absatz über Debian."), ("ja", "Debian についての段落。")]:
        (ref / f"debian-reference.{lang}.txt.gz").write_bytes(
            gzip.compress((para + "\n\n").encode() * 50)
        )
    (ref / "ch01.de.html").write_text("<html>ignored</html>")
    fortunes = tmp_path / "usr/share/games/fortunes"
    (fortunes / "de").mkdir(parents=True)
    (fortunes / "de/sprueche").write_text("Erster Spruch.\n%\nZweiter Spruch.\n%\n")
    (fortunes / "de/sprueche.dat").write_bytes(b"\x00\x01binary index")
    (fortunes / "off/de").mkdir(parents=True)
    (fortunes / "off/de/rude").write_text("skipped\n%\n")
    labels = [label for label, _ in multilingual_files(tmp_path)]
    assert labels == ["debian-reference:de", "debian-reference:ja", "fortunes:de/sprueche"]
    docs = build_default_corpus(max_chars_per_domain=1000, extra_domains=True, extras_root=tmp_path)
    multi = [d for d in docs if d.domain == "multilingual"]
    assert multi and sum(len(d.text) for d in multi) <= 1000
    text = "".join(t for t, _ in multilingual_texts(tmp_path))
    assert (
        "Zweiter Spruch." in text and "段落" in text and "skipped" not in text and "%" not in text
    )


# ---------------------------------------------------------------- split


def test_split_is_independent_of_order_and_covers_every_domain(corpus: list[Document]) -> None:
    train, val = split_documents(corpus, 0.05)
    assert len(train) + len(val) == len(corpus)
    assert {d.domain for d in val} == {d.domain for d in train} == set(DEFAULT_DOMAINS)
    shuffled = list(corpus)
    random.Random(7).shuffle(shuffled)
    train2, val2 = split_documents(shuffled, 0.05)
    assert set(val2) == set(val) and set(train2) == set(train)
    math_docs = [d for d in corpus if d.domain == "math"]
    frac = sum(d.domain == "math" for d in val) / len(math_docs)
    assert 0.02 < frac < 0.10  # hash-based: about val_fraction where there are many documents


def test_split_puts_each_document_by_its_hash() -> None:
    docs = [Document(text=f"document {i}", domain="d", source="s") for i in range(2000)]
    _, val = split_documents(docs, 0.1)
    assert set(val) == {d for d in docs if stable_hash("d", d.text) < int(0.1 * 2**64)}
    dup = [Document(text="same", domain="d", source=f"copy{i}") for i in range(3)] + docs
    train, val = split_documents(dup, 0.1)
    sides = {("same" in [d.text for d in val]), ("same" in [d.text for d in train])}
    assert len(sides) == 2  # the duplicates are all on one side, never both


def test_split_guarantees_a_validation_document_per_domain() -> None:
    docs = [Document(text=f"line {i}\n" * 3, domain="few", source=str(i)) for i in range(3)]
    docs += [Document(text="one\ntwo\nthree\nfour\n" * 10, domain="single", source="only")]
    train, val = split_documents(docs, 0.01)
    assert {d.domain for d in val} == {"few", "single"}
    assert {d.domain for d in train} == {"few", "single"}
    head = next(d for d in train if d.domain == "single")
    tail = next(d for d in val if d.domain == "single")
    assert head.text + tail.text == docs[-1].text and head.text.endswith("\n")


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 2])
def test_split_rejects_bad_fraction(fraction: float) -> None:
    with pytest.raises(ConfigError, match="val_fraction"):
        split_documents([Document(text="x", domain="d", source="s")], fraction)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab \n", max_size=400), st.integers(1, 50))
def test_chunk_text_respects_the_limit_and_keeps_content(text: str, max_chars: int) -> None:
    pieces = chunk_text(text, max_chars)
    assert all(0 < len(p) <= max_chars for p in pieces)
    assert "".join(pieces).replace("\n", "").replace(" ", "") == text.replace("\n", "").replace(
        " ", ""
    )
