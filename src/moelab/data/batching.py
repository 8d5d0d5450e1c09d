"""Training and validation batches from per-domain token arrays.

Training batches are a pure function of `(seed, step)`: each step derives its
own generator from the pair, so a run resumed at step `s` sees exactly the
batches it would have seen, with no iterator state to checkpoint.

Legend: B batch size, T sequence length (context), N tokens in a domain.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Literal

import numpy as np
import torch

from moelab.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

Mix = Literal["proportional", "uniform"] | Mapping[str, float]


def _check_shape(batch_size: int, seq_len: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ConfigError(f"seq_len must be a positive integer, got {seq_len!r}")


class TokenBatcher:
    """Random `seq_len + 1` windows from the domains' token arrays, indexed by step.

    `mix` sets how often each domain is drawn: `"proportional"` to its number of
    tokens (every token equally likely, as if the domains were concatenated),
    `"uniform"` (each domain equally often, which upweights small domains), or
    an explicit `{domain: weight}` mapping. Domains shorter than `seq_len + 1`
    tokens cannot give a window and are left out with a warning.
    """

    def __init__(
        self,
        tokens_by_domain: Mapping[str, np.ndarray],
        batch_size: int,
        seq_len: int,
        *,
        seed: int = 0,
        mix: Mix = "proportional",
    ) -> None:
        _check_shape(batch_size, seq_len)
        if not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        usable = {d: a for d, a in tokens_by_domain.items() if len(a) >= seq_len + 1}
        for d in tokens_by_domain.keys() - usable.keys():
            logger.warning(
                "domain %r has %d tokens, fewer than seq_len + 1 = %d; not sampled",
                d,
                len(tokens_by_domain[d]),
                seq_len + 1,
            )
        if not usable:
            raise DataError(
                f"no domain has at least seq_len + 1 = {seq_len + 1} tokens; "
                "use a shorter seq_len or more data"
            )
        self.domains = list(usable)
        self._arrays = [usable[d] for d in self.domains]
        self._num_starts = np.array([len(a) - seq_len for a in self._arrays], dtype=np.int64)
        self.weights = self._weights(mix)

    def _weights(self, mix: Mix) -> np.ndarray:
        if mix == "proportional":
            w = self._num_starts.astype(np.float64)
        elif mix == "uniform":
            w = np.ones(len(self.domains))
        elif isinstance(mix, Mapping):
            unknown = set(mix) - set(self.domains)
            if unknown:
                raise ConfigError(
                    f"mix names domains {sorted(unknown)} that have no usable "
                    f"data; domains are {self.domains}"
                )
            w = np.array([float(mix.get(d, 0.0)) for d in self.domains])
            if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
                raise ConfigError(
                    f"mix weights must be finite, >= 0 and not all 0, got {dict(mix)}"
                )
        else:
            raise ConfigError(f"mix must be 'proportional', 'uniform' or a mapping, got {mix!r}")
        return w / w.sum()

    def _rng(self, step: int) -> np.random.Generator:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        # SeedSequence mixes (seed, step) into well-separated PCG64 streams.
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, step])))

    def _draw(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(domain index [B], window start [B]) for `step`, from uniform draws only.

        Only `Generator.random` is used (inverse-CDF for the domain, scaling for
        the start), whose output for PCG64 is stable across numpy versions,
        unlike `choice`/`integers` which may change algorithm.
        """
        rng = self._rng(step)
        u = rng.random((2, self.batch_size))
        cdf = np.cumsum(self.weights)
        domain_B = np.minimum(
            np.searchsorted(cdf, u[0] * cdf[-1], side="right"), len(self.domains) - 1
        )
        start_B = np.minimum(
            (u[1] * self._num_starts[domain_B]).astype(np.int64), self._num_starts[domain_B] - 1
        )
        return domain_B, start_B

    def get_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs `x` [B, T] and next-token targets `y` [B, T] (int64) for `step`."""
        domain_B, start_B = self._draw(step)
        T = self.seq_len
        rows = np.stack(
            [self._arrays[d][s : s + T + 1] for d, s in zip(domain_B, start_B, strict=True)]
        )
        xy = torch.from_numpy(rows.astype(np.int64))  # (B, T + 1)
        return xy[:, :-1], xy[:, 1:]

    def domain_ids(self, step: int) -> torch.Tensor:
        """Index into `self.domains` of each row of `get_batch(step)` [B]."""
        return torch.from_numpy(self._draw(step)[0].astype(np.int64))

    def iterate(self, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches for steps `start_step, start_step + 1, ...` (endless)."""
        step = start_step
        while True:
            yield self.get_batch(step)
            step += 1

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iterate(0)


def batches(
    tokens_by_domain: Mapping[str, np.ndarray],
    batch_size: int,
    seq_len: int,
    *,
    seed: int,
    mix: Mix = "proportional",
    start_step: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless `(x [B, T], y [B, T])` training batches; see `TokenBatcher`."""
    return TokenBatcher(tokens_by_domain, batch_size, seq_len, seed=seed, mix=mix).iterate(
        start_step
    )


def val_batches(
    tokens_by_domain: Mapping[str, np.ndarray],
    batch_size: int,
    seq_len: int,
    *,
    max_batches_per_domain: int | None = 8,
) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """A fixed list of `(x, y)` batches per domain for validation loss.

    Windows do not overlap and, when capped, are spread evenly over the whole
    validation array rather than taken from its start (which would be a few
    documents). No randomness: the same arrays always give the same batches. A
    domain shorter than `seq_len + 1` tokens gives one shorter window, so every
    domain is measured. The last batch of a domain may have fewer than B rows.
    """
    _check_shape(batch_size, seq_len)
    out: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for domain, tokens in tokens_by_domain.items():
        n = len(tokens)
        if n < 2:
            logger.warning("validation data for %r has %d tokens; skipped", domain, n)
            continue
        T = min(seq_len, n - 1)
        num_windows = (n - 1) // T
        starts = np.arange(num_windows, dtype=np.int64) * T
        if max_batches_per_domain is not None and num_windows > max_batches_per_domain * batch_size:
            keep = np.linspace(0, num_windows - 1, max_batches_per_domain * batch_size)
            starts = starts[np.round(keep).astype(np.int64)]
        rows = np.stack([tokens[s : s + T + 1] for s in starts]).astype(np.int64)  # (W, T + 1)
        xy = torch.from_numpy(rows)
        out[domain] = [
            (xy[i : i + batch_size, :-1], xy[i : i + batch_size, 1:])
            for i in range(0, len(xy), batch_size)
        ]
    return out
