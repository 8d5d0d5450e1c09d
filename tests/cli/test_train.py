"""`moelab train` errors that need no data (runs that train are tests/train/test_compare.py)."""

from __future__ import annotations

from moelab.cli.main import main


def test_cli_bad_data_path_is_one_line(tmp_path, capsys):
    assert main(["train", "--model", "tiny-dense", "--data", str(tmp_path / "missing.txt"), "--out",
                 str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "missing.txt" in err and "does not exist" in err and "Traceback" not in err


def test_cli_unknown_model_is_clear(tmp_path, capsys):
    assert main(["train", "--model", "huge-moe", "--out", str(tmp_path / "r")]) == 2
    assert "unknown model preset 'huge-moe'" in capsys.readouterr().err
