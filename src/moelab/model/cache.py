"""KV caches: the decoder's one cache protocol and its implementations.

Legend: B batch rows, Hkv key/value heads, S cache columns (max length), T new tokens,
Dh head dim.

`Transformer.forward(..., cache=c)` asks the cache four things, whatever it is:
  - ``positions(B, T)``: default RoPE positions of the new tokens (None: the caller must
    give them);
  - ``attention_mask(B, T, window, attention_mask)``: which cached and new columns each
    new token may attend to (None: plain causal, SDPA's fastest path);
  - ``update(layer, k, v)``: store the new keys/values of one layer, return the keys and
    values attention reads;
  - ``advance(T)``: the forward is done, T more columns are filled.
Optionally ``attend(layer, q, k, v, window) -> y``: the cache writes the new keys/values
and runs attention itself (then ``update`` is not called); a packed batch of several
requests in one row needs it, since each request attends only to its own columns.
It also keeps ``rope`` (the cos/sin table over its columns, built once by the model) and
``max_len``.

Implementations:
  - `KVCache` (dynamic): attends to the filled prefix ``[:length + T]``, so shapes grow
    every step. Eager prefill and decode.
  - `StaticKVCache`: a view of the same buffers with shapes that never change: writes at
    a column held in a tensor and attends over all S columns with a mask, so one
    compiled graph serves every decode step (`generate(compile=True)`).
  - `moelab.serve.slots.PackedBatch`: the serving engine's step, many requests' tokens in
    one row over a cache of one slot per request (``attend``).
"""

from __future__ import annotations

from typing import Protocol

import torch


class Cache(Protocol):
    max_len: int
    rope: tuple[torch.Tensor, torch.Tensor] | None

    def positions(self, B: int, T: int) -> torch.Tensor | None: ...

    def attention_mask(
        self, B: int, T: int, window: int | None, attention_mask: torch.Tensor | None
    ) -> torch.Tensor | None: ...

    def update(self, layer: int, k_BHTD: torch.Tensor, v_BHTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def advance(self, num_tokens: int) -> None: ...

    @property
    def device(self) -> torch.device: ...


def causal_mask(
    B: int,
    q_col_T: torch.Tensor,
    S: int,
    window: int | None,
    key_valid_BS: torch.Tensor | None,
) -> torch.Tensor:
    """Boolean ``[B, 1, T, S]`` (True = may attend) for queries at columns ``q_col_T``.

    A key column is allowed when it is not after the query, within the sliding window
    (counted in columns) and valid for the row (``key_valid_BS``: False on left padding).
    """
    k_pos_1S = torch.arange(S, device=q_col_T.device).unsqueeze(0)
    q_pos_T1 = q_col_T.unsqueeze(1)
    allowed_TS = k_pos_1S <= q_pos_T1
    if window is not None:
        allowed_TS = allowed_TS & (q_pos_T1 - k_pos_1S < window)
    T = q_col_T.shape[0]
    allowed = allowed_TS.view(1, 1, T, S).expand(B, 1, T, S)
    if key_valid_BS is not None:
        allowed = allowed & key_valid_BS.bool().view(B, 1, 1, S)
        # A fully masked row (a padding query) would give NaN; let it see itself.
        diag = (k_pos_1S == q_pos_T1).view(1, 1, T, S)
        allowed = allowed | (diag & ~allowed.any(-1, keepdim=True))
    return allowed


def prefix_attention_mask(
    B: int, T: int, offset: int, window: int | None, attention_mask: torch.Tensor | None, device: torch.device
) -> torch.Tensor | None:
    """The mask of T new tokens after ``offset`` filled columns, or None for plain causal.

    Plain causal (`is_causal=True`, the fastest SDPA path) applies when there is no
    offset, no padding and no sliding window cutting in; a single new token (decode)
    without padding or window needs no mask at all.
    """
    S = offset + T
    needs_window = window is not None and S > window
    if attention_mask is None and not needs_window and (offset == 0 or T == 1):
        return None
    if attention_mask is not None and attention_mask.shape != (B, S):
        raise ValueError(f"attention_mask must be [batch, cached+new]=({B}, {S}), got {tuple(attention_mask.shape)}")
    q_col_T = torch.arange(offset, S, device=device)
    return causal_mask(B, q_col_T, S, window if needs_window else None, attention_mask)


def kv_buffers(
    n_layers: int, rows: int, max_len: int, n_kv_heads: int, head_dim: int, v_head_dim: int | None,
    dtype: torch.dtype, device: torch.device | str,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Zeroed keys ``[rows, Hkv, S, Dh]`` and values (``v_head_dim`` wide when the value
    heads differ from the key heads, as in MLA; None = head_dim), one of each per layer."""
    shape = (rows, n_kv_heads, max_len, head_dim)
    v_shape = (rows, n_kv_heads, max_len, v_head_dim or head_dim)
    return ([torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)],
            [torch.zeros(v_shape, dtype=dtype, device=device) for _ in range(n_layers)])


class KVCache:
    """Dynamic cache: preallocated ``k [B, Hkv, S, Dh]``, ``v [B, Hkv, S, Dv]`` per layer and the number of
    columns filled (``length``, the same for every row: left padding keeps rows aligned).
    Attention writes the new columns, then attends over ``[:length + T]``."""

    def __init__(
        self,
        *,
        n_layers: int,
        batch_size: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        v_head_dim: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        self.k, self.v = kv_buffers(n_layers, batch_size, max_len, n_kv_heads, head_dim, v_head_dim, dtype, device)
        self.max_len = max_len
        self.length = 0  # columns filled, advanced by `advance` after a full forward
        # RoPE cos/sin for positions 0..max_len-1, ``[max_len, Dh]`` each, filled by the model
        # on first use: a decode step then gathers B rows instead of recomputing cos/sin.
        self.rope: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def device(self) -> torch.device:
        return self.k[0].device

    def positions(self, B: int, T: int) -> torch.Tensor:
        return torch.arange(self.length, self.length + T, device=self.device).unsqueeze(0).expand(B, T)

    def attention_mask(
        self, B: int, T: int, window: int | None, attention_mask: torch.Tensor | None
    ) -> torch.Tensor | None:
        return prefix_attention_mask(B, T, self.length, window, attention_mask, self.device)

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

    def static_view(self, key_valid_BS: torch.Tensor) -> StaticKVCache:
        """A `StaticKVCache` over these buffers, writing next at column ``length``.

        ``key_valid_BS`` (bool, ``[B, max_len]``): False on each row's left padding.
        """
        return StaticKVCache(self, key_valid_BS)


class StaticKVCache:
    """The buffers of a `KVCache`, with shapes that never change (for `torch.compile`).

    The next column to write is a tensor (``col_1``), advanced in place, so the compiled
    graph takes it as an input instead of baking a Python int into its guards; attention
    reads all S columns and the mask hides what is not written yet or is padding.
    Positions must be given (left padding makes them differ from columns).
    """

    def __init__(self, cache: KVCache, key_valid_BS: torch.Tensor):
        self.k, self.v, self.max_len, self.rope = cache.k, cache.v, cache.max_len, cache.rope
        B = cache.k[0].shape[0]
        if tuple(key_valid_BS.shape) != (B, cache.max_len):
            raise ValueError(f"key_valid_BS must be [batch, max_len]=({B}, {cache.max_len}), "
                             f"got {tuple(key_valid_BS.shape)}")
        self.key_valid_BS = key_valid_BS.bool()
        self.col_1 = torch.tensor([cache.length], device=cache.device)

    @property
    def device(self) -> torch.device:
        return self.k[0].device

    @property
    def length(self) -> int:
        return int(self.col_1)  # a host sync: eager checks only

    def positions(self, B: int, T: int) -> None:
        return None

    def attention_mask(
        self, B: int, T: int, window: int | None, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        if attention_mask is not None:
            raise ValueError("a StaticKVCache holds its own padding mask (key_valid_BS); pass attention_mask=None")
        q_col_T = self.col_1 + torch.arange(T, device=self.device)
        return causal_mask(B, q_col_T, self.max_len, window, self.key_valid_BS)

    def update(self, layer: int, k_BHTD: torch.Tensor, v_BHTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cols_T = self.col_1 + torch.arange(k_BHTD.shape[2], device=self.device)
        self.k[layer].index_copy_(2, cols_T, k_BHTD)
        self.v[layer].index_copy_(2, cols_T, v_BHTD)
        return self.k[layer], self.v[layer]

    def advance(self, num_tokens: int) -> None:
        self.col_1.add_(num_tokens)
