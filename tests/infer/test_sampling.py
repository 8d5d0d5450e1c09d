from __future__ import annotations

import pytest
import torch

from moelab.errors import ConfigError
from moelab.infer.sampling import SamplingConfig, filter_top_k, filter_top_p, sample_next


def test_top_k_keeps_k_largest():
    x = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    kept = torch.isfinite(filter_top_k(x, 2))
    assert kept.tolist() == [[False, True, False, True, False]]


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.1, 0.3, 0.1]])
    kept = torch.isfinite(filter_top_p(probs.log(), 0.75))
    assert kept.tolist() == [[True, False, True, False]]  # 0.5 + 0.3 reaches 0.75
    assert torch.isfinite(filter_top_p(probs.log(), 1e-9)).sum() == 1  # the top token always survives


def test_sampling_follows_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0]]).expand(20000, 3)
    g = torch.Generator().manual_seed(0)
    ids = sample_next(logits, SamplingConfig(temperature=1.0), g)
    freq = torch.bincount(ids, minlength=3).float() / ids.numel()
    assert torch.allclose(freq, torch.softmax(logits[0], -1), atol=0.02)


@pytest.mark.parametrize("kw", [dict(temperature=-0.1), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)])
def test_config_validation(kw):
    with pytest.raises(ConfigError):
        SamplingConfig(**kw)
