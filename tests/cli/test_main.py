"""The `moelab` entry point: every subcommand's --help, one-line errors for bad flags."""

from __future__ import annotations

import pytest

from moelab.cli.main import SUBCOMMANDS, build_parser, main


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in SUBCOMMANDS) and "benchmarks.moe_layer" in out


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_subcommand_help_exits_0(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    assert f"usage: moelab {name}" in capsys.readouterr().out


def test_parser_with_one_subcommand_matches_the_full_one():
    full = build_parser()
    for name in SUBCOMMANDS:
        one = build_parser(name)
        assert one.parse_args([name, *_minimal(name)]).command == name
        assert full.parse_args([name, *_minimal(name)]).command == name


def _minimal(name: str) -> list[str]:
    return {"analyze": ["run"], "generate": ["run", "--prompt", "x"], "convert": ["x", "--to-hf", "y"],
            "lab": ["collapse"], "report": ["run"], "quantize": ["run", "out", "--format", "int8"],
            "serve": ["run"], "bench": ["serve", "--base-url", "http://127.0.0.1:8000"]}.get(name, [])


@pytest.mark.parametrize("argv,flag", [
    (["size", "tiny-moe", "--context", "lots"], "--context"),
    (["size", "tiny-moe", "--dtype", "fp7"], "--dtype"),
    (["train", "--steps", "many"], "--steps"),
    (["generate", "run", "--prompt", "x", "--temperature", "hot"], "--temperature"),
    (["convert", "x", "--to-hf", "y", "--dtype", "int3"], "--dtype"),
    (["convert", "x", "--to-gguf", "y.gguf", "--type", "q4_k"], "--type"),
    (["quantize", "x", "y", "--format", "int3"], "--format"),
    (["quantize", "x", "y", "--format", "int4", "--group-size", "big"], "--group-size"),
])
def test_bad_flag_value_is_one_line_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"moelab {argv[0]}: error: argument {flag}"), err


def test_unknown_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        main(["nosuchcommand"])
    assert e.value.code == 2
    assert "invalid choice: 'nosuchcommand'" in capsys.readouterr().err


def test_config_field_errors_name_the_flag(capsys, tmp_path):
    """The library says TrainConfig.steps; the user typed --steps, so the CLI says that."""
    assert main(["train", "--steps", "0", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "--steps must be" in err and "TrainConfig" not in err


def test_name_flags_leaves_fields_without_a_flag():
    from moelab.cli.main import build_parser, name_flags

    parser = build_parser("train")
    assert name_flags("TrainConfig.lr bad; TrainConfig.no_such_field bad", parser, "train") == (
        "--lr bad; TrainConfig.no_such_field bad")
