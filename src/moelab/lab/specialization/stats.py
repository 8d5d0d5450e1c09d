"""Expert specialisation: which experts each domain, token and position is routed to.

Route a held-out sample of each domain through a model and measure, per MoE layer
(the analyses of Mixtral, Jiang et al. 2024, §5):

* the distribution of each domain's routed assignments over experts (a domains x
  experts heatmap, rows sum to 1; Mixtral Fig. 7) and a specialisation score per
  (domain, expert): the share of the domain's tokens that the expert receives divided
  by the uniform share K/E (1 = no preference, E/K = the expert takes every token);
* vocabulary specialisation: per expert, the tokens it receives most often relative to
  their frequency (the fraction of a token's occurrences that go to the expert);
* routing consistency: how often consecutive tokens have the same first-choice expert
  and overlapping top-k sets, against what uniform random routing gives
  (1/E and 1 - C(E-K, K)/C(E, K); Mixtral Table 5);
* an expert co-activation matrix: the fraction of tokens routed to both i and j;
* a text sample coloured token by token by its first-choice expert (Mixtral Fig. 8).

Legend: B sequences, T positions, K experts per token, E experts, N tokens (B*T).
The pure statistics functions take routing tensors; `analyze_model` runs a model and
returns them all as a `SpecializationResult`. Nothing here writes files or HTML: that is
`moelab.lab.specialization.analysis` (files, checkpoints) and `moelab.lab.report` (HTML).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from moelab.errors import ConfigError, DataError
from moelab.lab.specialization.token_text import TokenText

logger = logging.getLogger(__name__)

ANALYSIS_FORMAT = "moelab-analysis"
ANALYSIS_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class AnalysisConfig:
    """How much held-out text to route and how much to report."""

    tokens_per_domain: int = 8192
    seq_len: int = 256
    batch_size: int = 8
    top_tokens: int = 8  # tokens listed per expert (vocabulary specialisation)
    min_token_count: int = 4  # a token must occur this often to be ranked
    sample_tokens: int = 120  # tokens of coloured text per domain

    def __post_init__(self) -> None:
        for name in ("tokens_per_domain", "seq_len", "batch_size", "top_tokens", "min_token_count",
                     "sample_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"AnalysisConfig.{name} must be a positive integer, got {value!r}")
        if self.seq_len < 2:
            raise ConfigError(f"AnalysisConfig.seq_len must be >= 2 (consistency needs pairs), got {self.seq_len}")


# --------------------------------------------------------------------------- statistics


def random_consistency_baseline(num_experts: int, top_k: int) -> tuple[float, float]:
    """What uniformly random top-k routing gives for `routing_consistency`.

    First choice: two independent uniform choices agree with probability 1/E.
    Top-k overlap: the next token's k experts avoid all k of this token's with
    probability C(E-K, K) / C(E, K) (choose K of the E-K others), so any overlap has
    probability 1 - C(E-K, K)/C(E, K) (0 terms when E-K < K: overlap is certain).
    """
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"need 1 <= top_k <= num_experts, got top_k={top_k}, num_experts={num_experts}")
    disjoint = math.comb(num_experts - top_k, top_k) / math.comb(num_experts, top_k)
    return 1.0 / num_experts, 1.0 - disjoint


def routing_consistency(expert_idx_BTK: torch.Tensor, num_experts: int) -> tuple[float, float, int]:
    """Rates at which consecutive tokens (t, t+1 in one sequence) share routing.

    Returns ``(first_choice_same, topk_overlap, pairs)``: the fraction of pairs whose
    first-choice experts are equal, the fraction whose top-k sets intersect, and the
    number of pairs. Pairs never cross sequence boundaries. Column 0 of K must be the
    first choice (the router's top-1), as `RoutingDecision.expert_idx` is.
    """
    if expert_idx_BTK.dim() != 3:
        raise ValueError(f"expert_idx must be [B, T, K], got shape {tuple(expert_idx_BTK.shape)}")
    B, T, K = expert_idx_BTK.shape
    if T < 2 or B == 0:
        return float("nan"), float("nan"), 0
    first_same = (expert_idx_BTK[:, 1:, 0] == expert_idx_BTK[:, :-1, 0]).float().mean().item()
    chosen_BTE = torch.zeros(B, T, num_experts, dtype=torch.bool)
    chosen_BTE.scatter_(2, expert_idx_BTK.long(), True)
    overlap = (chosen_BTE[:, 1:] & chosen_BTE[:, :-1]).any(-1).float().mean().item()
    return first_same, overlap, B * (T - 1)


def expert_distribution(expert_idx_NK: torch.Tensor, kept_NK: torch.Tensor | None, num_experts: int) -> np.ndarray:
    """Share of the routed (kept) assignments that each expert receives: ``[E]``, sums to 1.

    This is one row of the domains x experts heatmap. Dropped assignments (capacity
    overflow) are not routed tokens and are left out. All-zero when nothing is kept.
    """
    idx = expert_idx_NK.reshape(-1).long()
    if kept_NK is not None:
        idx = idx[kept_NK.reshape(-1)]
    counts = torch.bincount(idx, minlength=num_experts).double()
    total = counts.sum()
    return (counts / total).numpy() if total > 0 else counts.numpy()


def token_share(expert_idx_NK: torch.Tensor, num_experts: int) -> np.ndarray:
    """Fraction of tokens that have each expert among their top-k: ``[E]``, sums to K.

    Uniform routing gives K/E per expert; the specialisation score is this / (K/E).
    """
    N, _ = expert_idx_NK.shape
    chosen_NE = torch.zeros(N, num_experts, dtype=torch.bool)
    chosen_NE.scatter_(1, expert_idx_NK.long(), True)
    return chosen_NE.double().mean(0).numpy() if N else np.zeros(num_experts)


def coactivation(expert_idx_NK: torch.Tensor, num_experts: int) -> np.ndarray:
    """``[E, E]``: fraction of tokens routed to both i and j (diagonal: to i at all).

    Symmetric. With K=2 and random routing each off-diagonal entry is 2/(E(E-1)).
    """
    N, _ = expert_idx_NK.shape
    chosen_NE = torch.zeros(N, num_experts, dtype=torch.float64)
    chosen_NE.scatter_(1, expert_idx_NK.long(), 1.0)
    return (chosen_NE.t() @ chosen_NE / max(N, 1)).numpy()


@dataclass(frozen=True)
class TokenScore:
    token_id: int
    text: str
    count: int  # occurrences of the token in the sample
    to_expert: int  # of those, how many had this expert among their top-k
    fraction: float  # to_expert / count
    lift: float  # fraction / (K/E): >1 means the expert takes this token more than uniform


def vocabulary_specialization(
    token_ids_N: torch.Tensor,
    expert_idx_NK: torch.Tensor,
    num_experts: int,
    *,
    top: int,
    min_count: int,
    decode: Any = None,
) -> list[list[TokenScore]]:
    """Per expert, the `top` tokens it receives most often relative to their frequency.

    Ranked by the fraction of the token's occurrences routed to the expert (then by
    count); tokens seen fewer than `min_count` times are skipped, since a token seen
    once has fraction 0 or 1 by chance.
    """
    N, K = expert_idx_NK.shape
    uniform = K / num_experts
    ids, inverse = torch.unique(token_ids_N.long(), return_inverse=True)
    V = ids.numel()
    count_V = torch.bincount(inverse, minlength=V)
    # counts[v, e]: occurrences of token v with expert e among its top-k.
    flat = inverse.unsqueeze(1).expand(N, K).reshape(-1) * num_experts + expert_idx_NK.reshape(-1).long()
    counts_VE = torch.bincount(flat, minlength=V * num_experts).view(V, num_experts)
    eligible = count_V >= min_count
    out: list[list[TokenScore]] = []
    for e in range(num_experts):
        frac = counts_VE[:, e].double() / count_V.clamp_min(1).double()
        # Sort by fraction, then count (larger first); ineligible tokens last.
        # Two stable sorts (count, then fraction) give the lexicographic order exactly.
        key = torch.where(eligible, frac, torch.full_like(frac, -1.0))
        by_count = torch.argsort(count_V, descending=True, stable=True)
        order = by_count[torch.argsort(key[by_count], descending=True, stable=True)][:top]
        scores = []
        for v in order.tolist():
            if not bool(eligible[v]) or int(counts_VE[v, e]) == 0:
                continue
            tid = int(ids[v])
            scores.append(TokenScore(
                token_id=tid,
                text=decode(tid) if decode is not None else str(tid),
                count=int(count_V[v]),
                to_expert=int(counts_VE[v, e]),
                fraction=float(frac[v]),
                lift=float(frac[v]) / uniform,
            ))
        out.append(scores)
    return out


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Consistency:
    first_choice_same: float
    topk_overlap: float
    pairs: int
    random_first_choice: float
    random_topk_overlap: float


@dataclass(frozen=True)
class LayerSpecialization:
    layer: int
    domain_expert_share: dict[str, list[float]]  # domain -> [E], sums to 1 (heatmap row)
    specialization_score: dict[str, list[float]]  # domain -> [E]: token share / (K/E)
    consistency: dict[str, Consistency]  # domain (and "all") -> rates
    coactivation: list[list[float]]  # [E, E]
    top_tokens: list[list[TokenScore]]  # per expert

    @property
    def max_score(self) -> float:
        return max((max(v) for v in self.specialization_score.values()), default=float("nan"))


@dataclass(frozen=True)
class ColouredSample:
    domain: str
    layer: int
    pieces: list[str]
    first_expert: list[int]


@dataclass
class SpecializationResult:
    num_experts: int
    top_k: int
    domains: list[str]
    tokens_per_domain: dict[str, int]
    layers: list[LayerSpecialization]
    samples: list[ColouredSample]
    source: str = ""
    files: dict[str, str] = field(default_factory=dict)  # what -> path written
    data: str = ""  # which held-out data, in words (`analyze_checkpoint`)

    def domain_share_by_layer(self) -> dict[int, np.ndarray]:
        """Layer -> ``[domains, E]`` assignment shares (heatmap rows, each sums to 1)."""
        return {ls.layer: np.array([ls.domain_expert_share[d] for d in self.domains]) for ls in self.layers}

    def coactivation_by_layer(self) -> dict[int, np.ndarray]:
        """Layer -> the ``[E, E]`` co-activation matrix."""
        return {ls.layer: np.array(ls.coactivation, dtype=np.float64) for ls in self.layers}

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": ANALYSIS_FORMAT,
            "version": ANALYSIS_VERSION,
            "source": self.source,
            "data": self.data,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "uniform_share": 1.0 / self.num_experts,
            "uniform_token_share": self.top_k / self.num_experts,
            "domains": self.domains,
            "tokens_per_domain": self.tokens_per_domain,
            "layers": {
                str(ls.layer): {
                    "domain_expert_share": ls.domain_expert_share,
                    "specialization_score": ls.specialization_score,
                    "max_specialization_score": ls.max_score,
                    "consistency": {d: asdict(c) for d, c in ls.consistency.items()},
                    "coactivation": ls.coactivation,
                    "top_tokens": [[asdict(t) for t in ts] for ts in ls.top_tokens],
                }
                for ls in self.layers
            },
            "samples": [asdict(s) for s in self.samples],
            "files": self.files,
        }


# --------------------------------------------------------------------------- running a model


@dataclass
class _Routed:
    token_ids_BT: torch.Tensor
    expert_idx: dict[int, torch.Tensor]  # layer -> [B, T, K]
    kept: dict[int, torch.Tensor]  # layer -> [B, T, K]


def _windows(tokens: np.ndarray, seq_len: int, max_tokens: int) -> torch.Tensor:
    """Non-overlapping windows ``[B, T]`` spread evenly over a held-out array."""
    n = len(tokens)
    T = min(seq_len, n)
    num = n // T
    want = max(1, min(num, math.ceil(max_tokens / T)))
    starts = (np.round(np.linspace(0, num - 1, want)).astype(np.int64) * T) if num > 1 else np.zeros(1, np.int64)
    return torch.from_numpy(np.stack([np.asarray(tokens[s:s + T]) for s in starts]).astype(np.int64))


@torch.no_grad()
def route_tokens(model: torch.nn.Module, tokens_BT: torch.Tensor, batch_size: int) -> _Routed:
    """Run `model` in eval mode on ``[B, T]`` ids, keep each MoE layer's routing."""
    was_training = model.training
    model.eval()
    idx: dict[int, list[torch.Tensor]] = {}
    kept: dict[int, list[torch.Tensor]] = {}
    try:
        for i in range(0, tokens_BT.shape[0], batch_size):
            x = tokens_BT[i:i + batch_size].to(next(model.parameters()).device)
            out = model(x, return_routing=True, last_only=True)
            for layer, dec in (out.routing or {}).items():
                if dec.expert_idx.shape[-1] != getattr(model.cfg.moe, "top_k", dec.expert_idx.shape[-1]):
                    raise ConfigError("specialisation analysis needs token-choice routing (top-k per token)")
                b, t = x.shape
                idx.setdefault(layer, []).append(dec.expert_idx.view(b, t, -1).cpu())
                kept.setdefault(layer, []).append(dec.kept.view(b, t, -1).cpu())
    finally:
        model.train(was_training)
    return _Routed(
        tokens_BT,
        {k: torch.cat(v) for k, v in idx.items()},
        {k: torch.cat(v) for k, v in kept.items()},
    )


def analyze_model(
    model: torch.nn.Module,
    tokens_by_domain: Mapping[str, np.ndarray | torch.Tensor],
    *,
    tokenizer: Any | None = None,
    config: AnalysisConfig | None = None,
    source: str = "",
) -> SpecializationResult:
    """Route each domain's held-out tokens through `model` and compute every statistic.

    `model` is a `moelab.model.Transformer` (anything whose forward takes
    ``return_routing=True`` and returns per-layer `RoutingDecision`s); `tokens_by_domain`
    maps a domain name to a flat array of token ids.
    """
    cfg = config or AnalysisConfig()
    moe_cfg = getattr(getattr(model, "cfg", None), "moe", None)
    if moe_cfg is None:
        raise ConfigError("specialisation analysis needs an MoE model (ModelConfig.moe is None: a dense model)")
    E, K = moe_cfg.num_experts, moe_cfg.top_k
    if not tokens_by_domain:
        raise DataError("no held-out data to analyse (no domains given)")
    text = TokenText(tokenizer)
    max_len = getattr(model.cfg, "max_seq_len", cfg.seq_len)
    seq_len = min(cfg.seq_len, max_len)

    routed: dict[str, _Routed] = {}
    for domain, arr in tokens_by_domain.items():
        arr = np.asarray(arr)
        if arr.size < 2:
            logger.warning("domain %r has %d held-out tokens; skipped", domain, arr.size)
            continue
        routed[domain] = route_tokens(model, _windows(arr, seq_len, cfg.tokens_per_domain), cfg.batch_size)
    if not routed:
        raise DataError("every domain has fewer than 2 held-out tokens: nothing to analyse")
    domains = list(routed)
    layers_idx = sorted(next(iter(routed.values())).expert_idx)
    rand_first, rand_overlap = random_consistency_baseline(E, K)

    layers: list[LayerSpecialization] = []
    for layer in layers_idx:
        share, score, cons = {}, {}, {}
        all_idx, all_tok, all_bt = [], [], []
        for d in domains:
            r = routed[d]
            idx_BTK, kept_BTK = r.expert_idx[layer], r.kept[layer]
            idx_NK = idx_BTK.reshape(-1, K)
            share[d] = expert_distribution(idx_NK, kept_BTK.reshape(-1, K), E).tolist()
            score[d] = (token_share(idx_NK, E) / (K / E)).tolist()
            fs, ov, pairs = routing_consistency(idx_BTK, E)
            cons[d] = Consistency(fs, ov, pairs, rand_first, rand_overlap)
            all_idx.append(idx_NK)
            all_tok.append(r.token_ids_BT.reshape(-1))
            all_bt.append((fs, ov, pairs))
        pairs_total = sum(p for _, _, p in all_bt)
        cons["all"] = Consistency(
            sum(f * p for f, _, p in all_bt) / max(pairs_total, 1),
            sum(o * p for _, o, p in all_bt) / max(pairs_total, 1),
            pairs_total, rand_first, rand_overlap,
        )
        idx_all = torch.cat(all_idx)
        layers.append(LayerSpecialization(
            layer=layer,
            domain_expert_share=share,
            specialization_score=score,
            consistency=cons,
            coactivation=coactivation(idx_all, E).tolist(),
            top_tokens=vocabulary_specialization(
                torch.cat(all_tok), idx_all, E, top=cfg.top_tokens, min_count=cfg.min_token_count,
                decode=text.one,
            ),
        ))

    # Coloured text: the first, middle and last MoE layers (Mixtral Fig. 8 shows 0, 15, 31).
    show = sorted({layers_idx[0], layers_idx[len(layers_idx) // 2], layers_idx[-1]})
    samples = []
    for d in domains:
        r = routed[d]
        ids = r.token_ids_BT[0, : cfg.sample_tokens].tolist()
        pieces = text.pieces(ids)
        for layer in show:
            samples.append(ColouredSample(d, layer, pieces, r.expert_idx[layer][0, : len(ids), 0].tolist()))

    return SpecializationResult(
        num_experts=E,
        top_k=K,
        domains=domains,
        tokens_per_domain={d: int(routed[d].token_ids_BT.numel()) for d in domains},
        layers=layers,
        samples=samples,
        source=source,
    )


