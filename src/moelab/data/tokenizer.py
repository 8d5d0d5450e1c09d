"""Byte-level BPE tokenizer, trained with Hugging Face `tokenizers`.

Byte-level (GPT-2 style) means every string is encodable with no unknown
token and `decode(encode(text)) == text` exactly, for code, prose and any
language. Special tokens come first so their ids are fixed whatever the vocab
size: `<|endoftext|>` = 0 separates documents, `<|pad|>` = 1 pads batches.

Training is deterministic: the BPE trainer counts words and merges the most
frequent pair, breaking ties by the pair itself, so the same text gives the
same `tokenizer.json` bytes (tested across processes). Parallelism only
changes how counts are summed, not the result.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moelab.errors import ConfigError, DataError
from moelab.io import atomic_write_text

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)
EOS_ID = 0
PAD_ID = 1
# End-of-text tokens of the tokenizers people use (ours, Llama/Mistral, Gemma, Llama 3, ChatML):
# generation stops at whichever of them a tokenizer has.
EOS_STRINGS = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>")


def end_token_ids(tokenizer) -> tuple[int, ...]:
    """Ids of the `EOS_STRINGS` that `tokenizer` (``token_to_id``) knows."""
    return tuple(i for s in EOS_STRINGS if (i := tokenizer.token_to_id(s)) is not None)
DEFAULT_VOCAB_SIZE = 8192
# 256 byte symbols plus the special tokens: the smallest vocabulary that can encode anything.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
# Training on more than this many characters adds little to an 8k vocab but costs time.
DEFAULT_MAX_TRAIN_CHARS = 50_000_000


def _texts(docs: Sequence, max_chars: int, seed: int) -> list[str]:
    """The document texts, or a seeded sample of them when there are over `max_chars`."""
    texts = [d if isinstance(d, str) else d.text for d in docs]
    total = sum(len(t) for t in texts)
    if total <= max_chars:
        return texts
    order = list(range(len(texts)))
    random.Random(f"moelab-tokenizer-{seed}").shuffle(order)
    picked, size = [], 0
    for i in order:
        if size >= max_chars:
            break
        picked.append(i)
        size += len(texts[i])
    logger.info("training tokenizer on a %d-character sample of %d characters", size, total)
    return [texts[i] for i in sorted(picked)]


def train_tokenizer(
    docs: Sequence,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    *,
    seed: int = 0,
    max_train_chars: int = DEFAULT_MAX_TRAIN_CHARS,
) -> Tokenizer:
    """Train a byte-level BPE on `docs` (`Document`s or strings).

    `seed` only matters when the text exceeds `max_train_chars` and a sample is
    taken. The result may have fewer than `vocab_size` tokens if the text has
    too few distinct pairs; read `get_vocab_size()` for the actual size.
    """
    if not isinstance(vocab_size, int) or not MIN_VOCAB_SIZE <= vocab_size <= 2**31 - 1:
        raise ConfigError(
            f"vocab_size must be an integer >= {MIN_VOCAB_SIZE} "
            f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens), got {vocab_size!r}"
        )
    texts = _texts(docs, max_train_chars, seed)
    if not any(t.strip() for t in texts):
        raise DataError("cannot train a tokenizer: the training documents are empty")
    tokenizer = Tokenizer(models.BPE())
    # No prefix space: code and data are whitespace-sensitive, and documents
    # are concatenated with EOS in between, not fed one by one.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    assert tokenizer.token_to_id(EOS_TOKEN) == EOS_ID and tokenizer.token_to_id(PAD_TOKEN) == PAD_ID
    logger.info(
        "trained byte-level BPE: %d tokens (asked for %d) on %d documents",
        tokenizer.get_vocab_size(),
        vocab_size,
        len(texts),
    )
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, path: str | Path) -> Path:
    """Write `tokenizer.json` atomically (a crash never leaves half a file)."""
    path = Path(path)
    atomic_write_text(path, tokenizer.to_str(pretty=True))
    return path


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a `tokenizer.json` (or the `tokenizer.json` inside a folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"tokenizer file {str(path)!r} does not exist")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
        raise DataError(
            f"tokenizer file {str(path)!r} is not a valid tokenizer.json: {exc}"
        ) from exc
