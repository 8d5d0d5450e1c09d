"""Corpus, tokenizer and batches: the data side of moelab.

`prepare_data` is the entry point: it builds the default multi-domain corpus
(and/or user data), splits it, trains a byte-level BPE and caches the token
arrays; `TokenBatcher` / `batches` / `val_batches` turn those into tensors.
"""

from moelab.data.batching import TokenBatcher, batches, val_batches
from moelab.data.corpus import (
    DEFAULT_DOMAINS,
    DEFAULT_MAX_CHARS_PER_DOMAIN,
    Document,
    build_default_corpus,
    load_user_data,
    split_documents,
)
from moelab.data.loader import (
    DEFAULT_CACHE_DIR,
    DataConfig,
    PreparedData,
    load_cache_entry,
    prepare_data,
    prepare_data_from_config,
)
from moelab.data.tokenizer import EOS_ID, PAD_ID, load_tokenizer, train_tokenizer

__all__ = [
    "DEFAULT_CACHE_DIR",
    "DEFAULT_DOMAINS",
    "DEFAULT_MAX_CHARS_PER_DOMAIN",
    "EOS_ID",
    "PAD_ID",
    "DataConfig",
    "Document",
    "PreparedData",
    "TokenBatcher",
    "batches",
    "build_default_corpus",
    "load_tokenizer",
    "load_user_data",
    "load_cache_entry",
    "prepare_data",
    "prepare_data_from_config",
    "split_documents",
    "train_tokenizer",
    "val_batches",
]
