"""Shared fixtures: a small corpus (seconds to build) and the test-scale lab config."""

from __future__ import annotations

import pytest
import torch

from moelab.data.loader import PreparedData, prepare_data
from moelab.lab.failures import SCALES, LabConfig

VOCAB = 512


@pytest.fixture(scope="session")
def data(tmp_path_factory: pytest.TempPathFactory) -> PreparedData:
    # The four default domains, 40k characters each: about a second to build.
    return prepare_data(tmp_path_factory.mktemp("lab-data"), max_chars_per_domain=40_000, vocab_size=VOCAB)


@pytest.fixture(scope="session")
def lab_cfg() -> LabConfig:
    return SCALES["test"]


@pytest.fixture(autouse=True)
def _threads() -> None:
    # One thread: small ops on a busy 2-core machine spend more time spinning than computing.
    torch.set_num_threads(1)
