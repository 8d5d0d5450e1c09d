"""`moelab generate --expert-memory`: the resident run's text, the cache stats on stderr."""

from __future__ import annotations

import pytest
import torch

from moelab import rundir
from moelab.cli.main import main
from moelab.model import ModelConfig, Transformer
from moelab.moe import MoEConfig

from .test_generate import _tokenizer


@pytest.fixture
def run(tmp_path):
    moe = MoEConfig(d_model=32, d_expert=32, num_experts=4, top_k=2)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=48, max_seq_len=64,
                      moe=moe)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    _tokenizer(tmp_path / "tokenizer.json")
    return rundir.save_model(model, tmp_path / "run", tokenizer_path=tmp_path / "tokenizer.json")


def test_generate_with_expert_memory_prints_the_resident_text_and_the_stats(run, capsys):
    args = ["generate", str(run), "--prompt", "the cat sat", "--max-new-tokens", "6"]
    assert main(args) == 0
    resident = capsys.readouterr().out
    expert = 3 * 32 * 32 * 4
    assert main([*args, "--expert-memory", f"{2 * expert}", "--offload-policy", "lfu"]) == 0
    out = capsys.readouterr()
    assert out.out == resident
    assert "experts offloaded (lfu, per layer): 2/8 slots" in out.err and "hit rate" in out.err


def test_bad_expert_memory_is_one_line_naming_the_flag_or_field(run, capsys):
    args = ["generate", str(run), "--prompt", "the", "--max-new-tokens", "2"]
    assert main([*args, "--expert-memory", "lots"]) != 0
    assert "--expert-memory: cannot read 'lots'" in capsys.readouterr().err
    assert main([*args, "--expert-memory", "1KB"]) != 0
    err = capsys.readouterr().err
    assert "expert_memory=1000 bytes" in err and "smallest allowed value is 24576 bytes" in err


# One expert per MoE layer: int8 3264 bytes (2048 + 1024 codes, 128 + 64 of scales), int4 1920.
@pytest.mark.parametrize("fmt, extra, budget", [("int8", [], "8KiB"),
                                                ("int4", ["--group-size", "32", "--what", "all"], "4KiB")])
def test_generate_offloads_a_quantised_run_and_prints_its_resident_text(run, tmp_path, capsys, fmt, extra, budget):
    q = tmp_path / fmt
    assert main(["quantize", str(run), str(q), "--format", fmt, *extra]) == 0
    capsys.readouterr()
    args = ["generate", str(q), "--prompt", "the cat sat", "--max-new-tokens", "6"]
    assert main(args) == 0
    resident = capsys.readouterr().out
    assert main([*args, "--expert-memory", budget]) == 0
    out = capsys.readouterr()
    assert out.out == resident
    assert "experts offloaded (lru, per layer): 2/8 slots" in out.err and "hit rate" in out.err
