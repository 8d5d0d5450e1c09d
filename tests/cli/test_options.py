"""One spelling of dtypes across commands, `moelab --version`, and errors in words."""

from __future__ import annotations

import pytest

from moelab import __version__
from moelab.cli.main import build_parser, main


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"moelab {__version__}"


@pytest.mark.parametrize(("argv", "dest", "want"), [
    (["train", "--precision", "bfloat16"], "precision", "bf16"),
    (["train", "--precision", "bf16"], "precision", "bf16"),
    (["train", "--precision", "float32"], "precision", "fp32"),
    (["train", "--precision", "auto"], "precision", "auto"),
    (["convert", "x", "--to-hf", "y", "--dtype", "bf16"], "dtype", "bf16"),
    (["convert", "x", "--to-hf", "y", "--dtype", "bfloat16"], "dtype", "bf16"),
    (["size", "tiny-moe", "--dtype", "bfloat16"], "dtype", "bf16"),
    (["size", "tiny-moe", "--dtype", "float16"], "dtype", "fp16"),
    (["generate", "x", "--prompt", "p", "--dtype", "bfloat16"], "dtype", "bf16"),
    (["analyze", "x", "--dtype", "bf16"], "dtype", "bf16"),
])
def test_bf16_and_bfloat16_are_one_dtype_everywhere(argv, dest, want):
    assert getattr(build_parser(argv[0]).parse_args(argv), dest) == want


def test_a_bad_dtype_is_one_line_naming_both_spellings(capsys):
    with pytest.raises(SystemExit) as e:
        main(["size", "tiny-moe", "--dtype", "bfloat8"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "bf16/bfloat16" in err


def test_size_output_is_the_same_for_both_spellings(capsys):
    assert main(["size", "tiny-moe", "--dtype", "bf16"]) == 0
    a = capsys.readouterr().out
    assert main(["size", "tiny-moe", "--dtype", "bfloat16"]) == 0
    assert capsys.readouterr().out == a


def test_train_out_that_is_a_file_is_said_in_words(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["train", "--model", "tiny-dense", "--out", str(tmp_path / "f"), "--steps", "1", "--data",
                 str(tmp_path / "f"), "--cache-dir", str(tmp_path / "cache"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a file, not a folder" in err and "Errno" not in err


def test_report_out_errors_name_the_file_not_a_temporary(tmp_path, capsys):
    run = tmp_path / "runs" / "a" / "b" / "c" / "run"  # four levels down: found at any depth
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("")
    (tmp_path / "runs" / ".old").mkdir()
    (tmp_path / "out.html").mkdir()  # --out names a folder
    assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "out.html")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot write {tmp_path / 'out.html'}: it is a folder" in err
    assert ".tmp" not in err and "Errno" not in err


def test_report_finds_runs_at_any_depth_and_names_what_it_skipped(tmp_path):
    from moelab.lab.report import find_sources

    run = tmp_path / "a" / "b" / "c" / "d" / "run"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("")
    hidden = tmp_path / "a" / ".run.abc.old"
    hidden.mkdir()
    (hidden / "metrics.jsonl").write_text("")
    src = find_sources([tmp_path])
    assert src.runs == [run]
    assert src.skipped == [f"{hidden} (hidden)"]
