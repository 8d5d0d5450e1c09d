"""One reader of a run's config.json: every public reader of runs raises the same error."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from moelab import rundir
from moelab.cli.main import main
from moelab.errors import CheckpointError
from moelab.hf import load_any, load_moelab
from moelab.train import TrainConfig, train

from .conftest import tiny_cfg

MODEL = tiny_cfg().to_dict()

# name -> config.json content (None: no file). "claims" cases say they are a moelab run
# (their "format" names moelab), so even readers that also accept HF folders must agree.
BAD = {
    "missing": (None, False),
    "bad-json": ("{oops", False),
    "wrong-format": ({"format": "moelab", "version": 1, "model": MODEL}, True),
    "old-version": ({"format": "moelab-run", "version": 99, "model": MODEL}, True),
    "no-model": ({"format": "moelab-run", "version": 1, "train": {}}, True),
    "bad-model": ({"format": "moelab-run", "version": 1, "model": {**MODEL, "no_such_field": 1}}, True),
}


def _write(run: Path, content) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    if content is not None:
        text = content if isinstance(content, str) else json.dumps(content)
        (run / "config.json").write_text(text, encoding="utf-8")
    return run


def _expected(run: Path) -> str:
    with pytest.raises(CheckpointError) as e:
        rundir.model_config_from_run(run)
    return str(e.value)


def _resume(run: Path) -> None:
    # The run config is read before the data is touched: a stand-in with a vocab size is enough.
    train(tiny_cfg(), TrainConfig(steps=1, seq_len=8, device="cpu"), SimpleNamespace(vocab_size=1), run,
          resume=True, progress=False)


LIBRARY_READERS = {
    "rundir.read_run_config": lambda run: rundir.model_config_of(rundir.read_run_config(run), run),
    "rundir.load_model": rundir.load_model,
    "hf.load_moelab": load_moelab,
    "train(resume=True)": _resume,
}
CLI_READERS = {
    "moelab train --resume": lambda run: ["train", "--resume", "--out", str(run)],
    "moelab convert --to-hf": lambda run: ["convert", str(run), "--to-hf", str(run.parent / "hf")],
}
# Readers that also accept Hugging Face folders: they agree once the config claims to be a run.
SNIFFING_LIBRARY = {"hf.load_any": load_any}
SNIFFING_CLI = {
    "moelab size": lambda run: ["size", str(run)],
    "moelab generate": lambda run: ["generate", str(run), "--prompt", "x", "--tokenizer", str(run / "t.json")],
}


def _cases(readers: dict, *, claims_only: bool):
    return [pytest.param(case, reader, id=f"{reader}-{case}")
            for reader in readers for case, (_, claims) in BAD.items() if claims or not claims_only]


@pytest.mark.parametrize("case,reader", _cases(LIBRARY_READERS, claims_only=False)
                         + _cases(SNIFFING_LIBRARY, claims_only=True))
def test_library_readers_raise_the_same_error(tmp_path, case, reader):
    run = _write(tmp_path / "run", BAD[case][0])
    fn = {**LIBRARY_READERS, **SNIFFING_LIBRARY}[reader]
    with pytest.raises(CheckpointError) as e:
        fn(run)
    assert str(e.value) == _expected(run)


@pytest.mark.parametrize("case,reader", _cases(CLI_READERS, claims_only=False)
                         + _cases(SNIFFING_CLI, claims_only=True))
def test_cli_readers_print_the_same_one_line_error(tmp_path, capsys, case, reader):
    run = _write(tmp_path / "run", BAD[case][0])
    argv = {**CLI_READERS, **SNIFFING_CLI}[reader](run)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"moelab {argv[0]}: error: {_expected(run)}\n"


def test_messages_name_the_file_and_the_problem(tmp_path):
    want = {
        "missing": "config.json does not exist",
        "bad-json": "is not valid JSON",
        "wrong-format": '"format": "moelab-run"',
        "old-version": "version 99 is not supported",
        "no-model": '"model" entry is missing',
        "bad-model": "no_such_field",
    }
    for case, (content, _) in BAD.items():
        run = _write(tmp_path / case, content)
        msg = _expected(run)
        assert str(run / "config.json") in msg and want[case] in msg, (case, msg)


def test_is_run_dir_and_paths(tmp_path):
    run = _write(tmp_path / "run", {"format": "moelab-run", "version": 1, "model": MODEL})
    hf = _write(tmp_path / "hf", {"model_type": "mixtral"})
    assert rundir.is_run_dir(run) and rundir.is_run_dir(run / "model.safetensors")
    assert rundir.is_run_dir(run / "config.json")
    assert not rundir.is_run_dir(hf) and not rundir.is_run_dir(tmp_path / "nothing")
    assert not rundir.is_run_dir(_write(tmp_path / "junk", "{oops"))
    assert rundir.read_run_config(run / "model.safetensors")["model"] == MODEL
    assert rundir.model_config_from_run(run / "config.json") == tiny_cfg()


def test_write_then_read(tmp_path):
    path = rundir.write_run_config(tmp_path / "run", tiny_cfg(), {"steps": 3}, None, source={"hf_dir": "x"})
    cfg = rundir.read_run_config(path.parent)
    assert cfg["format"] == rundir.RUN_FORMAT and cfg["version"] == rundir.RUN_VERSION
    assert cfg["train"] == {"steps": 3} and cfg["source"] == {"hf_dir": "x"}
    assert rundir.model_config_from_run(path.parent) == tiny_cfg()
