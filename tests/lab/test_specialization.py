"""Specialisation statistics: invariants, and the consistency statistic against its
analytic random-routing baseline."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from moelab.data.tokenizer import train_tokenizer
from moelab.lab.specialization import (
    AnalysisConfig,
    TokenText,
    analyze_model,
    coactivation,
    expert_distribution,
    random_consistency_baseline,
    routing_consistency,
    token_share,
    vocabulary_specialization,
    write_analysis,
)
from moelab.model import ModelConfig, Transformer
from moelab.moe import MoEConfig

CASES = [(8, 2), (4, 1), (16, 4), (3, 2), (6, 3)]


def random_topk(B: int, T: int, E: int, K: int, g: torch.Generator) -> torch.Tensor:
    """Uniformly random top-k routing: K distinct experts per token, first choice uniform."""
    return torch.rand(B, T, E, generator=g).argsort(-1)[..., :K]


@pytest.mark.parametrize(("E", "K"), CASES)
def test_baseline_formula(E: int, K: int) -> None:
    first, overlap = random_consistency_baseline(E, K)
    assert first == pytest.approx(1 / E)
    # Brute force over all pairs of K-subsets.
    from itertools import combinations

    subsets = [set(c) for c in combinations(range(E), K)]
    hits = sum(bool(a & b) for a in subsets for b in subsets)
    assert overlap == pytest.approx(hits / len(subsets) ** 2)


@pytest.mark.parametrize(("E", "K"), CASES)
def test_consistency_matches_random_baseline_on_random_router(E: int, K: int) -> None:
    g = torch.Generator().manual_seed(E * 100 + K)
    idx = random_topk(64, 257, E, K, g)
    first, overlap, pairs = routing_consistency(idx, E)
    want_first, want_overlap = random_consistency_baseline(E, K)
    assert pairs == 64 * 256
    # 4 standard errors of a proportion over `pairs` samples.
    tol = lambda p: 4 * math.sqrt(p * (1 - p) / pairs) + 1e-9  # noqa: E731
    assert abs(first - want_first) < tol(want_first)
    assert abs(overlap - want_overlap) < tol(want_overlap)


def test_consistency_detects_sticky_routing_and_ignores_sequence_boundaries() -> None:
    E, K = 8, 2
    idx = torch.tensor([[0, 1]]).expand(4, 10, K).clone()  # every token to experts 0, 1
    first, overlap, _ = routing_consistency(idx, E)
    assert first == 1.0 and overlap == 1.0
    # Sequences that each use one fixed pair, different per sequence: pairs never cross rows.
    idx = torch.stack([torch.tensor([2 * b, 2 * b + 1]).expand(10, K) for b in range(4)])
    assert routing_consistency(idx, E)[:2] == (1.0, 1.0)


def test_distribution_share_and_coactivation_invariants() -> None:
    E, K = 6, 2
    g = torch.Generator().manual_seed(0)
    idx = random_topk(1, 500, E, K, g)[0]
    kept = torch.rand(500, K, generator=g) > 0.2
    dist = expert_distribution(idx, kept, E)
    assert dist.sum() == pytest.approx(1.0)
    share = token_share(idx, E)
    assert share.sum() == pytest.approx(K)
    co = coactivation(idx, E)
    assert np.allclose(co, co.T)
    assert np.allclose(np.diag(co), share)
    # Each token contributes K*(K-1) ordered off-diagonal pairs.
    assert (co.sum() - np.trace(co)) == pytest.approx(K * (K - 1))


def test_vocabulary_specialization_finds_a_token_owned_by_one_expert() -> None:
    E = 4  # top-1
    tokens = torch.tensor([5] * 20 + [7] * 20 + [9] * 2)
    experts = torch.tensor([2] * 20 + [0] * 10 + [1] * 10 + [3] * 2).unsqueeze(1)
    top = vocabulary_specialization(tokens, experts, E, top=3, min_count=4)
    assert top[2][0].token_id == 5 and top[2][0].fraction == 1.0 and top[2][0].lift == pytest.approx(4.0)
    assert top[0][0].token_id == 7 and top[0][0].fraction == 0.5
    assert top[3] == []  # token 9 is too rare to rank


def test_token_text_pieces_rebuild_the_text_including_split_characters() -> None:
    text = "naïve café — déjà vu 東京 print('ok')\n" * 3
    tok = train_tokenizer([text], vocab_size=300)
    ids = tok.encode(text, add_special_tokens=False).ids
    pieces = TokenText(tok).pieces(ids)
    assert len(pieces) == len(ids)
    assert "".join(pieces) == text


def tiny_moe_model(vocab: int, E: int = 4, K: int = 2, **moe) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=64,
                      moe=MoEConfig(d_model=32, d_expert=32, num_experts=E, top_k=K, **moe))
    return Transformer(cfg)


def test_analyze_model_heatmap_rows_sum_to_one_and_files_are_written(data, tmp_path) -> None:
    model = tiny_moe_model(data.vocab_size, capacity_factor=1.0)  # with drops: rows still sum to 1
    res = analyze_model(model, data.val, tokenizer=data.tokenizer,
                        config=AnalysisConfig(tokens_per_domain=512, seq_len=64, sample_tokens=40))
    assert res.domains == data.domains
    assert [ls.layer for ls in res.layers] == [0, 1]
    for ls in res.layers:
        for d in data.domains:
            assert sum(ls.domain_expert_share[d]) == pytest.approx(1.0)
            assert sum(ls.specialization_score[d]) == pytest.approx(res.num_experts)  # token share sums to K
        assert set(ls.consistency) == {*data.domains, "all"}
    write_analysis(res, tmp_path)
    saved = json.loads((tmp_path / "analysis.json").read_text())
    assert saved["format"] == "moelab-analysis"
    assert set(saved["layers"]) == {"0", "1"}
    frag = (tmp_path / "analysis.html").read_text()
    assert 'class="coloured-text"' in frag and "data:image/png;base64," in frag
    assert (tmp_path / saved["files"]["heatmap"]).is_file()


def test_model_with_random_router_matches_baseline(data, monkeypatch) -> None:
    """Through the whole model: a router whose logits are fresh noise routes like chance."""
    E, K = 8, 2
    model = tiny_moe_model(data.vocab_size, E=E, K=K)
    g = torch.Generator().manual_seed(1)
    for moe in model.moe_layers:
        monkeypatch.setattr(moe.router, "logits", lambda x: torch.randn(x.shape[0], E, generator=g))
    res = analyze_model(model, data.val, config=AnalysisConfig(tokens_per_domain=2048, seq_len=64))
    want_first, want_overlap = random_consistency_baseline(E, K)
    for ls in res.layers:
        c = ls.consistency["all"]
        assert abs(c.first_choice_same - want_first) < 4 * math.sqrt(want_first * (1 - want_first) / c.pairs)
        assert abs(c.topk_overlap - want_overlap) < 4 * math.sqrt(want_overlap * (1 - want_overlap) / c.pairs)


def test_dense_model_is_refused(data) -> None:
    from moelab.errors import ConfigError

    dense = Transformer(ModelConfig(vocab_size=data.vocab_size, d_model=32, n_layers=1, n_heads=2, d_ff=64))
    with pytest.raises(ConfigError, match="dense"):
        analyze_model(dense, data.val)


def test_analyze_uses_the_runs_recorded_data(tmp_path):
    """A run trained on --data is analysed on that data's validation split, not the default
    corpus, and the result says which data it used."""
    from moelab.cli.main import main
    from moelab.lab.specialization import AnalysisConfig, analyze_checkpoint

    folder = tmp_path / "recipes"
    folder.mkdir()
    for i in range(40):
        (folder / f"r{i}.txt").write_text(f"Recipe {i}: mix {i} cups of flour with water, bake for {i + 10} minutes.\n" * 8)
    run = tmp_path / "run"
    assert main(["train", "--model", "tiny-moe", "--data", str(folder), "--out", str(run), "--steps", "2",
                 "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1", "--cache-dir", str(tmp_path / "cache"),
                 "--no-progress", "--no-tensorboard", "--device", "cpu"]) == 0
    result = analyze_checkpoint(run, cache_dir=tmp_path / "cache",
                                config=AnalysisConfig(tokens_per_domain=64, seq_len=16, sample_tokens=8))
    assert result.domains == ["recipes"]  # the folder is the run's one domain
    assert "the run's training data" in result.data and str(folder) in result.data
    assert json.loads((run / "analysis.json").read_text())["data"] == result.data
