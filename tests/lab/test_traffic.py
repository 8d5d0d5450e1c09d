"""`moelab.lab.traffic`: routing statistics of recorded traffic, on records made by hand."""

from __future__ import annotations

import json

import pytest

from moelab.errors import DataError
from moelab.lab.traffic import analyze_traffic, read_records


def line(experts_per_token, layer="1", E=4):
    return json.dumps({"id": "r", "num_experts": E, "token_ids": list(range(len(experts_per_token))),
                       "routing": [{layer: {"experts": e, "weights": [0.5] * len(e)}} for e in experts_per_token]})


def test_collapsed_traffic(tmp_path):
    p = tmp_path / "log.jsonl"
    p.write_text(line([[0, 1]] * 5) + "\n" + line([[0, 2], [0, 3]]) + "\n")
    r = analyze_traffic(p)
    (layer,) = r.layers
    assert (r.requests, r.tokens, r.top_k, layer.layer) == (2, 7, 2, 1)
    assert layer.busiest_expert == 0 and layer.busiest_share == pytest.approx(0.5)  # 7 of 14 choices
    assert layer.load_share == pytest.approx([7 / 14, 5 / 14, 1 / 14, 1 / 14])
    assert layer.first_choice_same == 1.0 and layer.pairs == 4 + 1
    assert layer.coactivation[0][1] == pytest.approx(5 / 7)
    assert layer.random_first_choice_same == pytest.approx(1 / 4)


def test_alternating_traffic_is_inconsistent(tmp_path):
    p = tmp_path / "log.jsonl"
    p.write_text(line([[0, 1], [2, 3]] * 3) + "\n")
    (layer,) = analyze_traffic(p).layers
    assert layer.first_choice_same == 0.0 and layer.topk_overlap == 0.0 and layer.busiest_share == pytest.approx(0.25)


def test_torn_last_line_is_skipped_other_bad_lines_are_errors(tmp_path):
    p = tmp_path / "log.jsonl"
    good = line([[0, 1]] * 2)
    p.write_text(good + "\n" + good[: len(good) // 2])  # killed mid-write
    recs, E = read_records(p)
    assert len(recs) == 1 and E == 4
    p.write_text("not json\n" + good + "\n")
    with pytest.raises(DataError, match=r"log.jsonl:1"):
        read_records(p)
    p.write_text(json.dumps({"id": "x", "token_ids": [1]}) + "\n")
    with pytest.raises(DataError, match="no 'routing'"):
        read_records(p)
    with pytest.raises(DataError, match="no such"):
        read_records(tmp_path / "missing.jsonl")


def test_generate_record_format_and_expert_count(tmp_path):
    p = tmp_path / "gen.json"
    p.write_text(json.dumps({"num_experts": 8, "prompts": [
        {"token_ids": [1, 2], "routing": [{"0": {"experts": [5, 1]}}, {"0": {"experts": [5, 2]}}]}]}))
    r = analyze_traffic(p)
    assert r.num_experts == 8 and len(r.layers[0].load_share) == 8 and r.layers[0].first_choice_same == 1.0
    with pytest.raises(DataError, match="num_experts=4"):
        analyze_traffic(p, num_experts=4)
