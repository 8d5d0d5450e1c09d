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
