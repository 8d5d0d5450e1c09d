"""Small text helpers shared by the corpus sources: stable hashing and chunking."""

from __future__ import annotations

import hashlib


def stable_hash(*parts: str) -> int:
    """A 64-bit hash of strings that is the same on every machine and run.

    Python's `hash()` is salted per process (PYTHONHASHSEED), so anything that
    must be reproducible (document order, the train/validation split) uses this.
    Parts are joined with NUL so ("ab", "c") and ("a", "bc") differ.
    """
    digest = hashlib.blake2b("\0".join(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def chunk_text(text: str, max_chars: int) -> list[str]:
    """Split `text` into pieces of at most `max_chars`, preferring paragraph breaks.

    Paragraphs (separated by blank lines) are packed greedily; a paragraph that
    is too long is cut at line ends, and a line that is too long is cut hard.
    Joining the pieces with the separators they were cut at gives back `text`
    up to whitespace at the cuts, which is what a document boundary replaces.
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    text = text.strip("\n")
    if len(text) <= max_chars:
        return [text] if text.strip() else []
    pieces: list[str] = []
    current = ""
    for para in _split_keep_small(text, "\n\n", max_chars):
        if current and len(current) + 2 + len(para) > max_chars:
            pieces.append(current)
            current = para
        else:
            current = f"{current}\n\n{para}" if current else para
    if current:
        pieces.append(current)
    return [p for p in pieces if p.strip()]


def _split_keep_small(text: str, sep: str, max_chars: int) -> list[str]:
    """Split at `sep`, then recursively at line ends / hard cuts, so every part fits."""
    out: list[str] = []
    for part in text.split(sep):
        if len(part) <= max_chars:
            out.append(part)
        elif sep == "\n\n":
            lines = _split_keep_small(part, "\n", max_chars)
            # Re-pack lines so a long paragraph becomes a few near-full pieces.
            current = ""
            for line in lines:
                if current and len(current) + 1 + len(line) > max_chars:
                    out.append(current)
                    current = line
                else:
                    current = f"{current}\n{line}" if current else line
            if current:
                out.append(current)
        else:
            out.extend(part[i : i + max_chars] for i in range(0, len(part), max_chars))
    return out


def truncate_at_line(text: str, max_chars: int) -> str:
    """The longest prefix of `text` within `max_chars` that ends at a line end (or a hard cut)."""
    if len(text) <= max_chars:
        return text
    cut = text.rfind("\n", 0, max_chars)
    return text[:cut] if cut > 0 else text[:max_chars]
