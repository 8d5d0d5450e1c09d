"""Display text of token ids: the GPT-2 byte-level alphabet read backwards, so a byte-level
BPE token shows the bytes it stands for, and a character split across tokens is shown
whole (on the token that completes it) when a sample is coloured token by token."""

from __future__ import annotations

import codecs
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level alphabet: printable unicode char -> byte (inverse of bytes_to_unicode)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


class TokenText:
    """Turn token ids into display strings, for a `tokenizers.Tokenizer` (or None: ids)."""

    def __init__(self, tokenizer: Any | None):
        self.tokenizer = tokenizer

    def token_bytes(self, token_id: int) -> bytes | None:
        """The bytes a byte-level BPE token stands for, or None (special / not byte-level)."""
        if self.tokenizer is None:
            return None
        piece = self.tokenizer.id_to_token(token_id)
        table = _byte_decoder()
        if piece is None or piece.startswith("<|") or any(ch not in table for ch in piece):
            return None
        return bytes(table[ch] for ch in piece)

    def one(self, token_id: int) -> str:
        """Readable text of one token (partial UTF-8 shown with replacement chars)."""
        if self.tokenizer is None:
            return f"<{token_id}>"
        b = self.token_bytes(token_id)
        if b is not None:
            return b.decode("utf-8", errors="replace")
        return self.tokenizer.id_to_token(token_id) or self.tokenizer.decode([token_id])

    def pieces(self, token_ids: list[int]) -> list[str]:
        """Text of each token such that ''.join(pieces) is the decoded text.

        A character split across tokens is given to the token that completes it, so
        colouring by token never shows broken characters.
        """
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        out = []
        for tid in token_ids:
            b = self.token_bytes(tid)
            out.append(dec.decode(b) if b is not None else self.one(tid))
        if out:
            out[-1] += dec.decode(b"", final=True)
        return out
