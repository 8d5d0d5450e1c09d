"""Shared fixtures: a small prepared corpus, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from moelab.data import PreparedData, prepare_data

# Small enough that a build takes about a second, big enough for every domain
# to have several documents on both sides of the split.
SMALL = {"max_chars_per_domain": 40_000, "vocab_size": 512, "seed": 0}


@pytest.fixture(scope="session")
def small_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data-cache-a")


@pytest.fixture(scope="session")
def small_data(small_cache: Path) -> PreparedData:
    return prepare_data(small_cache, **SMALL)
