"""`moelab size` end to end: CLI table, JSON schema, errors without tracebacks, moelab presets and runs."""

from __future__ import annotations

import json

import pytest
import torch

from moelab import model
from moelab.cli.main import main

SCHEMA_KEYS = {
    "schema_version", "name", "source", "settings", "total_params", "active_params",
    "total_params_no_embed", "active_params_no_embed", "tied_embeddings",
    "params_by_component", "n_layers", "moe_layers", "flops_per_token",
    "attention_flops_per_token", "training_flops_per_token", "weight_bytes",
    "kv_cache_bytes", "serving_bytes", "min_gpus", "dense_equivalents", "published",
    "conventions", "notes", "expert_parallel", "moelab_format_bytes", "memory_plan",
}


def _json(capsys, *argv: str):
    assert main(["size", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_schema_is_stable(capsys):
    r = _json(capsys, "mixtral-8x7b")
    assert set(r) == SCHEMA_KEYS  # documented in docs/size.md: add keys, never rename
    assert set(r["weight_bytes"]) == {"fp32", "bf16", "fp8", "int4"}
    assert set(r["dense_equivalents"]) == {"same_active", "same_total"}
    assert r["weight_bytes"]["bf16"] == 2 * r["total_params"]
    assert r["min_gpus"] == 2  # 93.4 GB of bf16 weights > 72 GB usable on one 80 GB GPU
    assert r["moe_layers"][0]["skipped_experts"] == 6


def test_several_models_give_a_list(capsys):
    rs = _json(capsys, "mixtral-8x7b", "dense-13b", "--context", "1024", "--batch", "2")
    assert [r["name"] for r in rs] == ["mixtral-8x7b", "dense-13b"]
    # Dense 13B vs Mixtral 8x7B: similar compute per token, 3.6x the memory.
    assert rs[0]["flops_per_token"] < rs[1]["flops_per_token"]
    assert rs[0]["weight_bytes"]["bf16"] > 3.5 * rs[1]["weight_bytes"]["bf16"]
    assert rs[1]["settings"]["batch"] == 2


def test_textbook_table(capsys):
    assert main(["size", "textbook-8x7b"]) == 0
    out = capsys.readouterr().out
    for text in ("63.0B", "21.0B", "6 of 8", "75%"):
        assert text in out


def test_dense_equivalent_same_active_has_same_flops(capsys):
    r = _json(capsys, "qwen3-30b-a3b")
    same = r["dense_equivalents"]["same_active"]
    assert same["params"] == r["active_params"]
    assert same["flops_per_token"] == pytest.approx(r["flops_per_token"])


def test_list(capsys):
    assert main(["size", "--list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    from moelab.accounting.published import PRESETS

    assert len(lines) == len(PRESETS) and lines[0].startswith("mixtral-8x7b")


def test_hf_config_path(tmp_path, capsys):
    cfg = {"model_type": "mixtral", "vocab_size": 100, "hidden_size": 16, "intermediate_size": 32,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
           "num_local_experts": 4, "num_experts_per_tok": 2}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    r = _json(capsys, str(tmp_path))
    assert r["total_params"] == 2 * 100 * 16 + 2 * (4 * 16 * 16 + 4 * 3 * 16 * 32 + 16 * 4 + 32) + 16


@pytest.mark.parametrize("content,expected", [
    ('{"model_type": "gpt2"}', "model_type 'gpt2' is not supported"),
    # DeepseekV2Config has no default top-k: transformers leaves nothing to fill in.
    ('{"model_type": "deepseek_v2", "vocab_size": 10}', "'num_experts_per_tok' is missing, expected an int"),
    ('{"model_type": "qwen2_moe", "decoder_sparse_step": 0}', "'decoder_sparse_step' must be an int >= 1"),
    ("{oops", "not valid JSON"),
])
def test_errors_are_one_line(tmp_path, capsys, content, expected):
    path = tmp_path / "config.json"
    path.write_text(content)
    assert main(["size", str(path)]) == 2
    err = capsys.readouterr().err
    assert expected in err and str(path) in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_unknown_name(capsys):
    assert main(["size", "mixtral-9x9b"]) == 2
    assert "presets: mixtral-8x7b" in capsys.readouterr().err


def _count(cfg) -> int:
    with torch.device("meta"):
        net = model.Transformer(cfg)
    return sum(p.numel() for p in net.parameters())


def test_cli_accepts_moelab_presets_and_saved_configs(tmp_path, capsys):
    name = next(iter(model.PRESETS))
    assert main(["size", name, "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["total_params"] == _count(model.PRESETS[name])
    saved = {"format": "moelab-run", "version": 1, "model": model.PRESETS[name].to_dict()}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert main(["size", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total_params"] == r["total_params"]
