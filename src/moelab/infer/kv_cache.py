"""A static KV cache: preallocated keys and values for every layer.

Legend: B batch, H_kv key/value heads, S cached positions (max length), Dh head dim.

The cache holds ``k, v [B, H_kv, S, Dh]`` per layer and the number of positions filled
(``length``, the same for every row: left padding keeps rows aligned). Attention writes
the new positions then attends over ``[:length + T]``.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        *,
        n_layers: int,
        batch_size: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_len = max_len
        self.length = 0  # positions filled, advanced by `advance` after a full forward
        # RoPE cos/sin for positions 0..max_len-1, ``[max_len, Dh]`` each, filled by the model
        # on first use: a decode step then gathers B rows instead of recomputing cos/sin.
        self.rope: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, layer: int, k_BHTD: torch.Tensor, v_BHTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values for `layer`; return all keys/values so far."""
        T = k_BHTD.shape[2]
        end = self.length + T
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} positions needed, max_len={self.max_len}")
        self.k[layer][:, :, self.length : end] = k_BHTD
        self.v[layer][:, :, self.length : end] = v_BHTD
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens
