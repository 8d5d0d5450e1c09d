"""Next-token choice: greedy, temperature, top-k and top-p (nucleus) sampling.

Legend: B batch rows, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moelab.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """``temperature=0`` is greedy (argmax; top_k/top_p then have no effect)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, int | float) and math.isfinite(self.temperature) and self.temperature >= 0):
            raise ConfigError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 1):
            raise ConfigError(f"top_k must be an integer >= 1 or None, got {self.top_k!r}")
        if self.top_p is not None and not (isinstance(self.top_p, int | float) and 0 < self.top_p <= 1):
            raise ConfigError(f"top_p must be in (0, 1] or None, got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_top_k(logits_BV: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (ties at the k-th value are all kept)."""
    if k >= logits_BV.shape[-1]:
        return logits_BV
    kth_B1 = torch.topk(logits_BV, k, dim=-1).values[..., -1:]
    return logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))


def filter_top_p(logits_BV: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus (Holtzman et al. 2020): keep the smallest set of most likely tokens whose
    probability reaches p. The most likely token is always kept."""
    if p >= 1:
        return logits_BV
    sorted_BV, order_BV = torch.sort(logits_BV, dim=-1, descending=True)
    probs_BV = sorted_BV.softmax(-1)
    # Drop a token when the mass *before* it already reaches p.
    drop_sorted_BV = (probs_BV.cumsum(-1) - probs_BV) >= p
    drop_BV = drop_sorted_BV.scatter(-1, order_BV, drop_sorted_BV)
    return logits_BV.masked_fill(drop_BV, float("-inf"))


def sample_next(
    logits_BV: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Token ids ``[B]`` chosen from the last-position logits ``[B, V]``."""
    if cfg.greedy:
        return logits_BV.argmax(dim=-1)
    logits_BV = logits_BV.float() / cfg.temperature
    if cfg.top_k is not None:
        logits_BV = filter_top_k(logits_BV, cfg.top_k)
    if cfg.top_p is not None:
        logits_BV = filter_top_p(logits_BV, cfg.top_p)
    probs_BV = logits_BV.softmax(dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)
