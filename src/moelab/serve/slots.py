"""The serving engine's KV cache: one row ("slot") per running request, each row with its
own length. The decoder's third `moelab.model.cache.Cache` implementation.

Legend: N slots, B rows of one forward, T new tokens per row, S columns per slot,
Hkv key/value heads, Dh head dim.

`SlotKVCache` holds ``k, v [N, Hkv, S, Dh]`` per layer. A forward runs over a *contiguous*
range of slots through a `SlotView`, which tells the model each row's positions, writes
each row's new keys/values at that row's own next columns and attends over
``[:max(length) + T]`` with a mask hiding each row's unwritten columns. The range is a
view (no copy): gathering the active rows instead would copy ``B * S * Hkv * Dh`` floats
per layer per step (16 MB per layer at 16 slots of 512 columns for the 200M benchmark
model, a fifth of what the weights cost to read). So the engine keeps its running
requests packed at the front of the cache and `move`s one request's filled columns when a
hole opens, once per request rather than once per step.

Why not paged (vLLM's PagedAttention): paging exists to share memory between requests
whose final lengths are unknown. Here admission reserves ``prompt + max_tokens`` columns
for a request up front (SGLang's rule: nothing is ever preempted), so a slot of
``max_len`` columns always suffices, and on CPU SDPA over a contiguous row is what runs
fast; the price is memory sized for the longest request, ``N * S`` columns, which for
the 200M model at 16 x 1024 columns is 16 * 1024 * 8 layers * 2 * 4 * 64 * 4 B = 268 MB.
"""

from __future__ import annotations

import torch

from moelab.model.cache import causal_mask


class SlotKVCache:
    """Preallocated per-slot keys/values; lengths live with the engine's requests."""

    def __init__(
        self,
        *,
        n_layers: int,
        slots: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        shape = (slots, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.slots, self.max_len = slots, max_len
        # RoPE cos/sin for positions 0..max_len-1, built once by the model (`rope_table`).
        self.rope: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def device(self) -> torch.device:
        return self.k[0].device

    def view(self, first_slot: int, lengths: list[int]) -> SlotView:
        """A cache for one forward over slots ``first_slot .. first_slot + len(lengths) - 1``,
        whose rows hold ``lengths`` columns already."""
        return SlotView(self, first_slot, lengths)

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` columns of slot `src` into slot `dst` (all layers)."""
        if src == dst or length == 0:
            return
        for buf in (*self.k, *self.v):
            buf[dst, :, :length] = buf[src, :, :length]

    def swap(self, a: int, b: int, length_a: int, length_b: int) -> None:
        """Exchange the filled columns of slots `a` and `b`."""
        if a == b:
            return
        n = max(length_a, length_b)
        for buf in (*self.k, *self.v):
            tmp = buf[a, :, :n].clone()
            buf[a, :, :n] = buf[b, :, :n]
            buf[b, :, :n] = tmp


class SlotView:
    """The `Cache` protocol over a contiguous range of slots with per-row lengths."""

    def __init__(self, cache: SlotKVCache, first_slot: int, lengths: list[int]):
        B = len(lengths)
        if B == 0 or first_slot < 0 or first_slot + B > cache.slots:
            raise ValueError(f"slots {first_slot}..{first_slot + B - 1} are outside the cache's {cache.slots} slots")
        self.cache, self.lo, self.hi = cache, first_slot, first_slot + B
        self.lengths = list(lengths)
        self.max_len = cache.max_len
        self.length = max(lengths)  # what the model checks against max_seq_len
        self.uniform = min(lengths) == self.length
        self.len_B = torch.tensor(lengths, device=cache.device)

    @property
    def device(self) -> torch.device:
        return self.cache.device

    # The model builds the RoPE table once and keeps it on the cache it was given.
    @property
    def rope(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.cache.rope

    @rope.setter
    def rope(self, value: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        self.cache.rope = value

    def positions(self, B: int, T: int) -> torch.Tensor:
        return self.len_B.unsqueeze(1) + torch.arange(T, device=self.device)

    def attention_mask(
        self, B: int, T: int, window: int | None, attention_mask: torch.Tensor | None
    ) -> torch.Tensor | None:
        if attention_mask is not None:
            raise ValueError("a SlotView masks by each row's length; pass attention_mask=None")
        S = self.length + T
        needs_window = window is not None and S > window
        if self.uniform and not needs_window and (T == 1 or self.length == 0):
            return None  # every row sees all columns so far: plain causal / no mask
        if self.uniform:
            return causal_mask(B, torch.arange(self.length, S, device=self.device), S,
                               window if needs_window else None, None)
        # Rows of different lengths: query t of row b sits at column len_b + t.
        q_col_BT1 = (self.len_B.unsqueeze(1) + torch.arange(T, device=self.device)).unsqueeze(-1)
        k_col_11S = torch.arange(S, device=self.device).view(1, 1, S)
        allowed_BTS = k_col_11S <= q_col_BT1
        if needs_window:
            allowed_BTS = allowed_BTS & (q_col_BT1 - k_col_11S < window)
        return allowed_BTS.unsqueeze(1)

    def update(self, layer: int, k_BHTD: torch.Tensor, v_BHTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, _, T, _ = k_BHTD.shape
        end = self.length + T
        if end > self.max_len:
            raise ValueError(f"slot cache is full: {end} columns needed, max_len={self.max_len}")
        k_buf, v_buf = self.cache.k[layer], self.cache.v[layer]
        if self.uniform:
            k_buf[self.lo : self.hi, :, self.length : end] = k_BHTD
            v_buf[self.lo : self.hi, :, self.length : end] = v_BHTD
        else:
            rows_BT = torch.arange(self.lo, self.hi, device=self.device).unsqueeze(1).expand(B, T)
            cols_BT = self.positions(B, T)
            # Indexing [rows, :, cols] puts the advanced dims first: values are [B, T, Hkv, Dh].
            k_buf[rows_BT, :, cols_BT] = k_BHTD.transpose(1, 2)
            v_buf[rows_BT, :, cols_BT] = v_BHTD.transpose(1, 2)
        return k_buf[self.lo : self.hi, :, :end], v_buf[self.lo : self.hi, :, :end]

    def advance(self, num_tokens: int) -> None:
        self.lengths = [n + num_tokens for n in self.lengths]
        self.length += num_tokens
        self.len_B = self.len_B + num_tokens
