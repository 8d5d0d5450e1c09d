"""`moelab train --init-from`: full fine-tuning starts from the source's weights (and loss)."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from moelab.cli.main import main
from moelab.data import TokenBatcher, prepare_data
from moelab.rundir import load_model
from moelab.train import read_metrics

TEXT = "".join(f"The {c} cat sat on the {m} mat and looked at the {c} dog. " for c in ("red", "blue", "green")
               for m in ("big", "small"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A small text folder, a tiny MoE config, and a source run trained on them for 40 steps."""
    root = tmp_path_factory.mktemp("ft")
    folder = root / "pets"
    folder.mkdir()
    for i in range(30):
        (folder / f"p{i}.txt").write_text(TEXT * 6)
    moe = dict(d_model=32, d_expert=32, num_experts=4, top_k=2)
    cfg = dict(vocab_size=320, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=64, moe=moe)
    (root / "model.json").write_text(json.dumps(cfg))
    common = ["--data", str(folder), "--batch-size", "4", "--seq-len", "32", "--eval-batches", "1",
              "--cache-dir", str(root / "cache"), "--precision", "fp32", "--device", "cpu", "--threads", "1",
              "--no-progress", "--no-tensorboard"]
    assert main(["train", "--model", str(root / "model.json"), "--out", str(root / "src"), "--steps", "40",
                 "--lr", "1e-2", "--eval-interval", "20", *common]) == 0
    return root, common


def test_init_from_starts_from_the_sources_loss(setup, capsys):
    root, common = setup
    capsys.readouterr()
    assert main(["train", "--init-from", str(root / "src"), "--out", str(root / "ft"), "--steps", "2", *common]) == 0
    printed = capsys.readouterr().out
    assert "expert load" in printed and "->" in printed
    first_ft = read_metrics(root / "ft", kind="train")[0]
    first_src = read_metrics(root / "src", kind="train")[0]  # the source's own first step: a random init
    # The source model's loss on the fine-tuning run's first batch (same data, same tokenizer, step 0).
    data = prepare_data(root / "cache", data_paths=[root / "pets"], tokenizer=root / "src" / "tokenizer.json")
    x, y = TokenBatcher(data.train, 4, 32, seed=0).get_batch(0)
    model = load_model(root / "src").model.train()
    with torch.no_grad():
        want = float(model(x, targets=y, return_logits=False).lm_loss)
    assert first_ft["lm_loss"] == pytest.approx(want, abs=1e-4)
    assert first_ft["lm_loss"] < first_src["lm_loss"] - 1.5, (first_ft["lm_loss"], first_src["lm_loss"])
    cfg = json.loads((root / "ft" / "config.json").read_text())
    assert cfg["source"]["init_from"] == str((root / "src").resolve()) and cfg["source"]["kind"] == "moelab"
    evals = read_metrics(root / "ft", kind="eval")
    assert len(evals[0]["expert_load"]) == 2 and 0.25 <= evals[0]["busiest_expert_share"] <= 1.0


def test_init_from_refuses_what_cannot_be_fine_tuned(setup, tmp_path, capsys):
    root, common = setup
    assert main(["quantize", str(root / "src"), str(tmp_path / "q"), "--format", "int8"]) == 0
    capsys.readouterr()
    assert main(["train", "--init-from", str(tmp_path / "q"), "--out", str(tmp_path / "ft"), *common]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "quantised checkpoint (moelab-int8) cannot be fine-tuned" in err
    assert main(["train", "--init-from", str(root / "src"), "--model", "tiny-moe", "--out", str(tmp_path / "x")]) == 2
    assert "drop --model" in capsys.readouterr().err
    assert not (tmp_path / "ft").exists() and not (tmp_path / "x").exists()


def test_model_dir_without_init_from_says_it_trains_from_scratch(setup, caplog):
    root, common = setup
    with caplog.at_level(logging.INFO, logger="moelab.cli.train"):
        assert main(["train", "--model", str(root / "src"), "--out", str(root / "scratch"), "--steps", "1",
                     *common]) == 0
    lines = [r.getMessage() for r in caplog.records if "random weights" in r.getMessage()]
    assert len(lines) == 1 and "--init-from" in lines[0]


def test_init_from_a_hugging_face_folder(tmp_path):
    """An imported family: the fine-tuning run starts from the HF model's own loss on its first
    batch, with the data encoded by the folder's tokenizer."""
    from moelab.hf import load_hf

    from .conftest import make_hf
    from .test_generate import _tokenizer

    hf = make_hf("mixtral", seed=1)  # vocab 64
    hf.save_pretrained(tmp_path / "hf")
    _tokenizer(tmp_path / "hf" / "tokenizer.json")
    folder = tmp_path / "text"
    folder.mkdir()
    for i in range(20):
        (folder / f"t{i}.txt").write_text("the cat sat on a mat and the dog ran . " * 20)
    assert main(["train", "--init-from", str(tmp_path / "hf"), "--data", str(folder), "--out", str(tmp_path / "ft"),
                 "--steps", "1", "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1", "--precision", "fp32",
                 "--device", "cpu", "--threads", "1", "--cache-dir", str(tmp_path / "cache"), "--no-progress",
                 "--no-tensorboard"]) == 0
    data = prepare_data(tmp_path / "cache", data_paths=[folder], tokenizer=tmp_path / "hf" / "tokenizer.json")
    assert data.eos_id == 0  # the folder's own end-of-text token separates documents
    x, y = TokenBatcher(data.train, 2, 16, seed=0).get_batch(0)
    model = load_hf(tmp_path / "hf").model.train()
    with torch.no_grad():
        want = float(model(x, targets=y, return_logits=False).lm_loss)
    assert read_metrics(tmp_path / "ft", kind="train")[0]["lm_loss"] == pytest.approx(want, abs=1e-4)
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["source"]["kind"] == "mixtral"
