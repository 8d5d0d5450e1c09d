"""`moelab lab`: bad input is one line naming the flag, before any data is built."""

from __future__ import annotations

from moelab.cli.main import main


def test_unknown_run_names_the_flag_and_the_runs(capsys, tmp_path) -> None:
    rc = main(["lab", "collapse", "--runs", "broken-no-aux", "nope", "--cache-dir", str(tmp_path / "cache"),
               "--out", str(tmp_path / "out")])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("moelab lab: error: --runs: unknown run(s) nope for collapse")
    assert "dense-active" in err  # the runs it could have named
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


def test_workers_below_one_is_one_line_naming_the_flag(capsys, tmp_path) -> None:
    for argv in (["lab", "collapse", "--workers", "0"], ["compare", "--workers", "0", "--moe", "tiny-moe"]):
        rc = main([*argv, "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out")])
        assert rc == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--workers must be >= 1, got 0" in err, argv
        assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()
