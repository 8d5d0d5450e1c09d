"""The serving engine's KV cache: one row ("slot") per running request, each row with its
own length. The decoder's third `moelab.model.cache.Cache` implementation.

Legend: N slots, B decoding requests, P tokens of a packed step, C a prefill chunk,
S columns per slot, H query heads, Hkv key/value heads, Dh head dim.

`SlotKVCache` holds ``k, v [N, Hkv, S, Dh]`` per layer. One engine step is one forward of
a `PackedBatch`: the tokens of every request in the step side by side in one row
(``[1, P]``: one token per decoding request, then each prefill chunk), so the MoE layers
see all of them at once and read each expert's weights once per step. Everything in the
decoder is per token except attention, which the packed batch does itself
(`PackedBatch.attend`, the optional hook of the `Cache` protocol): it writes each token's
key/value at its request's next column and runs SDPA per request -- the decoding requests
together as ``[B, H, 1, Dh]`` against their slots, each prefill chunk as ``[1, H, C, Dh]``.

The decoding requests occupy the *contiguous* slots ``[0, B)``, so their keys are a view
of the cache (no copy): gathering scattered rows instead would copy ``B * S * Hkv * Dh``
floats per layer per step (16 MB per layer at 16 slots of 512 columns for the 200M
benchmark model, a fifth of what the weights cost to read). So the engine keeps its
running requests packed at the front of the cache and `move`s one request's filled
columns when a hole opens, once per request rather than once per step.

Why not paged (vLLM's PagedAttention): paging exists to share memory between requests
whose final lengths are unknown. Here admission reserves ``prompt + max_tokens`` columns
for a request up front (SGLang's rule: nothing is ever preempted), so a slot of
``max_len`` columns always suffices, and on CPU SDPA over a contiguous row is what runs
fast; the price is memory sized for the longest request, ``N * S`` columns, which for
the 200M model at 16 x 1024 columns is 16 * 1024 * 8 layers * 2 * 4 * 64 * 4 B = 268 MB.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moelab.model.cache import kv_buffers, prefix_attention_mask
from moelab.model.layers import sink_attention


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
        v_head_dim: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        self.k, self.v = kv_buffers(n_layers, slots, max_len, n_kv_heads, head_dim, v_head_dim, dtype, device)
        self.slots, self.max_len = slots, max_len
        # RoPE cos/sin for positions 0..max_len-1, built once by the model (`rope_table`).
        self.rope: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def device(self) -> torch.device:
        return self.k[0].device

    def packed(self, segments: list[Segment]) -> PackedBatch:
        """The cache of one packed forward (see `PackedBatch`)."""
        return PackedBatch(self, segments)

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


@dataclass(frozen=True)
class Segment:
    """The tokens of one request in a packed step: ``n`` tokens for `slot`, whose cache
    holds ``length`` columns before this step."""

    slot: int
    length: int
    n: int


def _attention(q, k, v, mask, is_causal: bool, gqa: bool, sinks_H: torch.Tensor | None) -> torch.Tensor:
    """SDPA, or the sink reference when the layer has sink logits (SDPA has no sink term)."""
    if sinks_H is not None:
        return sink_attention(q, k, v, sinks_H, mask, is_causal)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)


class PackedBatch:
    """The `Cache` protocol for one packed forward over `SlotKVCache` (batch size 1).

    ``segments``: first the decoding requests, one token each, in slots ``0 .. B-1`` in
    order; then any number of prefill chunks. The model's input is their tokens in the
    same order.
    """

    def __init__(self, cache: SlotKVCache, segments: list[Segment]):
        if not segments:
            raise ValueError("a packed batch needs at least one segment")
        B = 0
        while B < len(segments) and segments[B].n == 1 and segments[B].slot == B:
            B += 1
        self.cache, self.segments, self.B = cache, segments, B
        self.P = sum(s.n for s in segments)
        for s in segments:
            if s.length + s.n > cache.max_len:
                raise ValueError(f"slot {s.slot}: {s.length + s.n} columns needed, max_len={cache.max_len}")
        self.max_len = cache.max_len
        # The model checks ``length + P`` against max_seq_len for a prefix cache; here each
        # segment was checked against the slot length above, which is <= max_seq_len.
        self.length = 0
        dev = cache.device
        self.pos_P = torch.cat([torch.arange(s.length, s.length + s.n, device=dev) for s in segments])
        self.dec_len_B = torch.tensor([s.length for s in segments[:B]], device=dev)
        self.dec_S = max((s.length for s in segments[:B]), default=0) + 1  # key columns the decoding rows read
        # Where the decoding rows' new keys go, as rows of the cache viewed ``[N * Hkv * S, Dh]``:
        # one index_copy_ per layer instead of an advanced-index assignment (with the masks built
        # once per step, this took the engine's batch-8 step from 29.2 to 27.9 ms, A/B).
        _, Hkv, S, _ = cache.k[0].shape
        rows_B1 = torch.arange(B, device=dev).unsqueeze(1)
        self.dec_flat = ((rows_B1 * Hkv + torch.arange(Hkv, device=dev)) * S + self.dec_len_B.unsqueeze(1)).reshape(-1)
        self._prefill_mask: dict[tuple[int, int | None], torch.Tensor | None] = {}
        self._dec_mask: dict[int | None, torch.Tensor | None] = {}

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
        if (B, T) != (1, self.P):
            raise ValueError(f"a PackedBatch of {self.P} tokens takes input [1, {self.P}], got [{B}, {T}]")
        return self.pos_P.unsqueeze(0)

    def attention_mask(self, B: int, T: int, window: int | None, attention_mask: torch.Tensor | None) -> None:
        if attention_mask is not None:
            raise ValueError("a PackedBatch masks per request; pass attention_mask=None")
        return None  # `attend` builds each request's own mask

    def update(self, layer: int, k_BHTD: torch.Tensor, v_BHTD: torch.Tensor):
        raise TypeError("a PackedBatch attends itself: the model calls PackedBatch.attend")

    def attend(self, layer: int, q_1HPD: torch.Tensor, k_1HPD: torch.Tensor, v_1HPD: torch.Tensor,
               window: int | None, sinks_H: torch.Tensor | None = None) -> torch.Tensor:
        """Write this step's keys/values, attend per request; ``[1, H, P, Dh]``. With
        ``sinks_H`` (gpt-oss) each softmax has the layer's sink logits, as the decoder's own
        path (`moelab.model.layers.sink_attention`) computes them."""
        k_buf, v_buf = self.cache.k[layer], self.cache.v[layer]
        H, Hkv = q_1HPD.shape[1], k_1HPD.shape[1]
        gqa = H != Hkv
        out = []
        B = self.B
        if B:
            # Decoding requests: token b goes to slot b, column len_b.
            Dh = k_buf.shape[-1]
            k_buf.view(-1, Dh).index_copy_(0, self.dec_flat, k_1HPD[0, :, :B].transpose(0, 1).reshape(-1, Dh))
            v_buf.view(-1, v_buf.shape[-1]).index_copy_(
                0, self.dec_flat, v_1HPD[0, :, :B].transpose(0, 1).reshape(-1, v_buf.shape[-1]))
            S = self.dec_S
            q_BH1D = q_1HPD[0, :, :B].transpose(0, 1).unsqueeze(2)
            mask = self._decode_mask(S, window)
            y = _attention(q_BH1D, k_buf[:B, :, :S], v_buf[:B, :, :S], mask, False, gqa, sinks_H)
            out.append(y.squeeze(2).transpose(0, 1).unsqueeze(0))  # [1, H, B, Dh]
        p = B
        for i, s in enumerate(self.segments[B:]):
            end = s.length + s.n
            k_buf[s.slot, :, s.length : end] = k_1HPD[0, :, p : p + s.n]
            v_buf[s.slot, :, s.length : end] = v_1HPD[0, :, p : p + s.n]
            if (i, window) not in self._prefill_mask:  # the same for every layer
                self._prefill_mask[i, window] = prefix_attention_mask(1, s.n, s.length, window, None, self.device)
            mask = self._prefill_mask[i, window]
            y = _attention(q_1HPD[:, :, p : p + s.n], k_buf[s.slot : s.slot + 1, :, :end],
                           v_buf[s.slot : s.slot + 1, :, :end], mask, mask is None and s.n > 1, gqa, sinks_H)
            out.append(y)
            p += s.n
        return out[0] if len(out) == 1 else torch.cat(out, dim=2)

    def _decode_mask(self, S: int, window: int | None) -> torch.Tensor | None:
        """``[B, 1, 1, S]``: row b sees columns ``<= len_b`` (within the window); None
        when every row sees all S columns. The same for every layer: built once."""
        if window not in self._dec_mask:
            lengths = [s.length for s in self.segments[: self.B]]
            needs_window = window is not None and S > window
            if min(lengths) == S - 1 and not needs_window:
                self._dec_mask[window] = None
            else:
                q_B11 = self.dec_len_B.view(-1, 1, 1)
                k_11S = torch.arange(S, device=self.device).view(1, 1, S)
                allowed = k_11S <= q_B11
                if needs_window:
                    allowed = allowed & (q_B11 - k_11S < window)
                self._dec_mask[window] = allowed.unsqueeze(1)
        return self._dec_mask[window]

    def advance(self, num_tokens: int) -> None:
        pass  # the engine keeps each request's length
