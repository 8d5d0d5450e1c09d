"""What the model did for real traffic: routing statistics of recorded requests.

Legend: N routed tokens, K experts per token, E experts, L MoE layers.

Input: per generated token, the experts (and weights) chosen in every MoE layer at the
position that produced it, as written by

  - ``moelab serve --routing-log LOG.jsonl``: one JSON object per finished request,
    ``{"id", "num_experts", "token_ids", "routing": [{"<layer>": {"experts", "weights"}}, ...]}``;
  - ``moelab generate --record-routing OUT.json``: ``{"num_experts", "prompts": [{"token_ids",
    "routing"}, ...]}`` (the same per-token record).

Per MoE layer (`TrafficLayer`): how the served tokens spread over the experts (the load
share, the busiest expert's share: 1/E balanced, 1 collapsed), which experts fire together
(co-activation), and how often consecutive generated tokens of one request keep their
experts, against what random routing would give (`random_consistency_baseline`). These are
the held-out analysis's statistics (`moelab.lab.specialization.stats`), here on traffic.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from moelab.errors import DataError
from moelab.lab.specialization.stats import (
    coactivation,
    expert_distribution,
    random_consistency_baseline,
    routing_consistency,
)

log = logging.getLogger(__name__)


@dataclass
class TrafficRecord:
    token_ids: list[int]
    routing: list[dict]  # per generated token: {"<layer>": {"experts": [...], "weights": [...]}}


@dataclass
class TrafficLayer:
    layer: int
    tokens: int
    load_share: list[float]  # [E], sums to 1
    busiest_expert: int
    busiest_share: float
    coactivation: list[list[float]]  # [E, E]
    first_choice_same: float  # consecutive generated tokens of one request
    topk_overlap: float
    pairs: int
    random_first_choice_same: float
    random_topk_overlap: float


@dataclass
class TrafficResult:
    source: str
    requests: int
    tokens: int
    num_experts: int
    top_k: int
    layers: list[TrafficLayer]

    def to_dict(self) -> dict:
        return asdict(self)


def read_records(path: str | Path) -> tuple[list[TrafficRecord], int | None]:
    """The records of a serve routing log (JSONL) or a generate routing record (JSON), and
    the expert count they state (None if they do not). A torn last line of a log (the
    server was killed while writing) is skipped with a warning; any other bad line is an
    error naming the file and line."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such routing record")
    text = p.read_text()
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, dict) and "prompts" in whole:  # moelab generate --record-routing
        recs = [_record(p, i, r) for i, r in enumerate(whole["prompts"])]
        return recs, whole.get("num_experts")
    lines = text.splitlines()
    out, experts = [], None
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1 and not text.endswith("\n"):
                log.warning("%s: the last line is incomplete (the server stopped while writing it); skipped", p)
                continue
            raise DataError(f"{p}:{i + 1}: not a JSON object (expected a moelab serve routing log line)") from None
        out.append(_record(p, i, obj))
        experts = obj.get("num_experts", experts)
    if not out:
        raise DataError(f"{p}: no routing records (expected `moelab serve --routing-log` lines or a "
                        "`moelab generate --record-routing` file)")
    return out, experts


def _record(p: Path, i: int, obj) -> TrafficRecord:
    if not isinstance(obj, dict) or not isinstance(obj.get("routing"), list):
        raise DataError(f"{p}: record {i + 1} has no 'routing' list (was it recorded with routing?)")
    return TrafficRecord(list(obj.get("token_ids") or []), obj["routing"])


def analyze_traffic(path: str | Path, *, num_experts: int | None = None) -> TrafficResult:
    """Routing statistics per MoE layer over every generated token in the record."""
    records, stated = read_records(path)
    layers = sorted({int(k) for r in records for tok in r.routing for k in tok}, key=int)
    if not layers:
        raise DataError(f"{path}: the records hold no routed tokens")
    per_layer: dict[int, list[list[list[int]]]] = {layer: [] for layer in layers}  # layer -> request -> token -> K
    for r in records:
        for layer in layers:
            per_layer[layer].append([tok[str(layer)]["experts"] for tok in r.routing if str(layer) in tok])
    K = len(per_layer[layers[0]][0][0]) if per_layer[layers[0]] and per_layer[layers[0]][0] else 0
    seen_max = max(e for reqs in per_layer.values() for toks in reqs for ks in toks for e in ks)
    E = num_experts or stated or seen_max + 1
    if seen_max >= E:
        raise DataError(f"{path}: expert index {seen_max} but num_experts={E}")
    out = []
    rand_first, rand_overlap = random_consistency_baseline(E, K)
    for layer in layers:
        reqs = [torch.tensor(toks, dtype=torch.long) for toks in per_layer[layer] if toks]
        idx_NK = torch.cat(reqs) if reqs else torch.zeros(0, K, dtype=torch.long)
        share = expert_distribution(idx_NK, None, E)
        pairs = same = overlap = 0.0
        for t in reqs:  # consistency within each request, pairs weighted
            if t.shape[0] >= 2:
                f, o, n = routing_consistency(t.unsqueeze(0), E)
                same, overlap, pairs = same + f * n, overlap + o * n, pairs + n
        busiest = int(np.argmax(share))
        out.append(TrafficLayer(
            layer=layer, tokens=int(idx_NK.shape[0]), load_share=share.tolist(), busiest_expert=busiest,
            busiest_share=float(share[busiest]), coactivation=coactivation(idx_NK, E).tolist(),
            first_choice_same=same / pairs if pairs else float("nan"),
            topk_overlap=overlap / pairs if pairs else float("nan"), pairs=int(pairs),
            random_first_choice_same=rand_first, random_topk_overlap=rand_overlap,
        ))
    tokens = sum(len(r.routing) for r in records)
    return TrafficResult(str(path), len(records), tokens, E, K, out)


def traffic_summary_lines(result: TrafficResult) -> list[str]:
    r = result
    lines = [f"{r.requests} requests, {r.tokens} generated tokens, {r.num_experts} experts, top-{r.top_k} "
             f"(from {r.source})",
             f"layer  busiest expert (share; balanced = {1 / r.num_experts:.3f})  first-choice kept (random)  top-k overlap (random)"
             ]
    for layer in r.layers:
        lines.append(f"{layer.layer:>5}  {layer.busiest_expert:>3} ({layer.busiest_share:.3f})"
                     f"{'':22}{layer.first_choice_same:.3f} ({layer.random_first_choice_same:.3f})"
                     f"{'':12}{layer.topk_overlap:.3f} ({layer.random_topk_overlap:.3f})")
    return lines


def plot_traffic_load(result: TrafficResult, path: str | Path) -> Path:
    """Heatmap: MoE layers x experts, each cell the expert's share of the layer's tokens."""
    from moelab.lab.plots import plot_heatmap

    return plot_heatmap(np.array([layer.load_share for layer in result.layers]), path, xlabel="expert",
                        ylabel="MoE layer", row_labels=[str(layer.layer) for layer in result.layers],
                        title=f"traffic: share of tokens per expert ({result.tokens} tokens)")
