"""User data: text files, folders, JSONL, and the errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moelab.data import load_user_data, prepare_data
from moelab.data.corpus import USER_DOC_CHARS
from moelab.errors import DataError


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_text_file_domain_is_its_name(tmp_path: Path) -> None:
    path = tmp_path / "poems.txt"
    path.write_text("Roses are red.\r\n\r\nViolets are blue.\r\n", encoding="utf-8")
    (doc,) = load_user_data([path])
    assert doc.domain == "poems" and doc.source == "poems.txt#0"
    assert doc.text == "Roses are red.\n\nViolets are blue.\n"  # CRLF normalised


def test_long_text_file_is_cut_into_documents_at_paragraphs(tmp_path: Path) -> None:
    paragraph = "word " * 199 + "end."
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join([paragraph] * 100), encoding="utf-8")
    docs = load_user_data([path])
    assert len(docs) > 1 and all(len(d.text) <= USER_DOC_CHARS + 1 for d in docs)
    assert all(d.text.rstrip().endswith("end.") for d in docs)


def test_folder_domain_is_the_folder_name_and_hidden_files_are_skipped(tmp_path: Path) -> None:
    folder = tmp_path / "notes"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("bee\n")
    (folder / "sub" / "a.md").write_text("ay\n")
    (folder / ".hidden").write_text("\x00 not read")
    (folder / ".git").mkdir()
    (folder / ".git" / "config").write_text("not read\n")
    docs = load_user_data([str(folder)])
    assert [(d.domain, d.source, d.text) for d in docs] == [
        ("notes", "notes/b.txt#0", "bee\n"),
        ("notes", "notes/sub/a.md#0", "ay\n"),
    ]


def test_jsonl_with_and_without_domain(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"text": "def f(): pass", "domain": "code"},
            {"text": "Bonjour le monde", "domain": "french"},
            {"text": "no domain here", "id": 3},
            {"text": "   "},  # empty records are skipped with a warning
        ],
    )
    docs = load_user_data([path])
    assert [(d.domain, d.text, d.source) for d in docs] == [
        ("code", "def f(): pass", "mixed.jsonl:1"),
        ("french", "Bonjour le monde", "mixed.jsonl:2"),
        ("mixed", "no domain here", "mixed.jsonl:3"),
    ]


def test_nonexistent_path_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "corpus.txt"
    with pytest.raises(DataError, match=f"data path '{missing}' does not exist"):
        load_user_data([missing])


@pytest.mark.parametrize("content", [b"", b"  \n\n\t\n"])
def test_empty_file_is_an_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "empty.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=f"data file '{path}' is empty"):
        load_user_data([path])


def test_empty_folder_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".only-hidden").write_text("x")
    with pytest.raises(DataError, match="contains no files"):
        load_user_data([tmp_path / "empty"])


def test_no_paths_is_an_error() -> None:
    with pytest.raises(DataError, match="no data paths"):
        load_user_data([])


def test_binary_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "image.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(DataError, match=r"image\.png' looks binary"):
        load_user_data([path])


def test_undecodable_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("café crème".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt' is not UTF-8 text: byte 0xe9 at offset 3"):
        load_user_data([path])


def test_jsonl_record_without_text_names_file_and_line(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "recs.jsonl", [{"text": "fine"}, {"body": "wrong field"}])
    with pytest.raises(
        DataError, match=rf"{path}:2: record has no 'text' field \(it has: 'body'\)"
    ):
        load_user_data([path])


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"bad\.jsonl:2: not valid JSON"),
        ('["a list"]', r"bad\.jsonl:2: expected a JSON object"),
        ('{"text": 3}', r"bad\.jsonl:2: 'text' must be a string, got int"),
        ('{"text": "x", "domain": ""}', r"bad\.jsonl:2: 'domain' must be a non-empty"),
    ],
)
def test_malformed_jsonl_lines_name_the_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n' + line + "\n")
    with pytest.raises(DataError, match=message):
        load_user_data([path])


def test_jsonl_with_only_empty_texts_is_an_error(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "blank.jsonl", [{"text": ""}, {"text": " "}])
    with pytest.raises(DataError, match="no records with non-empty 'text'"):
        load_user_data([path])


def test_prepare_data_reports_bad_paths_before_building(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing.txt' does not exist"):
        prepare_data(tmp_path / "cache", data_paths=[tmp_path / "missing.txt"], vocab_size=300)
    assert not (tmp_path / "cache").exists()


def test_prepare_data_on_user_data_only(tmp_path: Path) -> None:
    _jsonl(
        tmp_path / "qa.jsonl",
        [{"text": f"Question {i}? Answer {i * 7}.", "domain": "qa"} for i in range(200)],
    )
    (tmp_path / "story.txt").write_text("Once upon a time.\n" * 300)
    data = prepare_data(
        tmp_path / "cache",
        data_paths=[tmp_path / "qa.jsonl", tmp_path / "story.txt"],
        vocab_size=300,
    )
    assert data.domains == ["qa", "story"]
    for domain in data.domains:
        assert len(data.train[domain]) > 0 and len(data.val[domain]) > 0
    # Same files, new cache key only if their content changes.
    assert prepare_data(
        tmp_path / "cache",
        data_paths=[tmp_path / "qa.jsonl", tmp_path / "story.txt"],
        vocab_size=300,
    ).from_cache
    (tmp_path / "story.txt").write_text("A different story.\n" * 300)
    changed = prepare_data(
        tmp_path / "cache",
        data_paths=[tmp_path / "qa.jsonl", tmp_path / "story.txt"],
        vocab_size=300,
    )
    assert not changed.from_cache and changed.fingerprint != data.fingerprint


def test_literal_special_token_in_user_text_is_not_a_boundary(tmp_path: Path) -> None:
    _jsonl(
        tmp_path / "gpt2.jsonl",
        [{"text": f"story {i} <|endoftext|> continues <|pad|>"} for i in range(40)],
    )
    data = prepare_data(tmp_path / "cache", data_paths=[tmp_path / "gpt2.jsonl"], vocab_size=300)
    for split in ("train", "val"):
        tokens = getattr(data, split)["gpt2"]
        assert int((tokens == 0).sum()) == data.stats[split]["gpt2"]["docs"]  # only separators
        assert 1 not in tokens
    first = data.val["gpt2"][: int(np.argmax(data.val["gpt2"] == 0))]
    assert "<|endoftext|> continues <|pad|>" in data.tokenizer.decode(first.tolist())


def test_a_folder_with_symlinks_reads_each_file_once(tmp_path, caplog):
    import logging

    from moelab.data.corpus import user_data_files

    folder = tmp_path / "licenses"
    folder.mkdir()
    (folder / "GPL-3").write_text("the GNU general public license, version 3\n" * 20)
    (folder / "MIT").write_text("permission is hereby granted, free of charge\n" * 20)
    (folder / "GPL").symlink_to("GPL-3")  # as Debian's common-licenses has it
    (folder / "links").mkdir()
    (folder / "links" / "MIT-again").symlink_to(folder / "MIT")
    with caplog.at_level(logging.INFO, logger="moelab.data.corpus"):
        files = user_data_files([folder, folder / "MIT"])  # the same file named twice, too
    assert sorted(p.resolve().name for p, _, _ in files) == ["GPL-3", "MIT"]
    assert "skipped 3 that are the same file as another" in caplog.text
    assert "GPL-3 (= licenses/GPL)" in caplog.text or "GPL (= licenses/GPL-3)" in caplog.text
