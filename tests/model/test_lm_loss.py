"""The chunked LM loss equals the reference (logits + F.cross_entropy): value and gradients."""

from __future__ import annotations

import pytest
import torch

from moelab.model import ModelConfig, Transformer
from moelab.model.lm_loss import IGNORE_INDEX, chunked_lm_loss, lm_loss_reference


def _grads(fn, x, w, t):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    loss = fn(x, w, t)
    (3.0 * loss).backward()  # a non-unit upstream gradient: backward must scale by it
    return loss.detach(), x.grad, w.grad


@pytest.mark.parametrize(("N", "D", "V", "chunk"), [(1, 4, 7, 128), (37, 8, 50, 16), (64, 16, 300, 64), (130, 8, 20, 1)])
@pytest.mark.parametrize("ignored", [0.0, 0.3])
def test_chunked_equals_reference(N, D, V, chunk, ignored):
    g = torch.Generator().manual_seed(N * 7 + V)
    x = torch.randn(N, D, dtype=torch.float64, generator=g)
    w = torch.randn(V, D, dtype=torch.float64, generator=g)
    t = torch.randint(0, V, (N,), generator=g)
    t[torch.rand(N, generator=g) < ignored] = IGNORE_INDEX
    if bool((t == IGNORE_INDEX).all()):
        t[0] = 1
    ref = _grads(lambda x, w, t: lm_loss_reference(x @ w.t(), t), x, w, t)
    got = _grads(lambda x, w, t: chunked_lm_loss(x, w, t, chunk_rows=chunk), x, w, t)
    for r, c in zip(ref, got, strict=True):
        torch.testing.assert_close(c, r, rtol=1e-10, atol=1e-12)


def test_chunked_without_grad_and_all_ignored():
    x, w = torch.randn(5, 4), torch.randn(9, 4)
    t = torch.tensor([1, 2, 3, 4, 5])
    with torch.no_grad():
        torch.testing.assert_close(chunked_lm_loss(x, w, t, chunk_rows=2), lm_loss_reference(x @ w.t(), t))
    all_ignored = torch.full((5,), IGNORE_INDEX)
    assert torch.isnan(chunked_lm_loss(x, w, all_ignored)) and torch.isnan(lm_loss_reference(x @ w.t(), all_ignored))
    with pytest.raises(ValueError, match=r"x must be \[N, D\]"):
        chunked_lm_loss(x, w, t[:3])


@pytest.mark.parametrize("tie", [False, True])
def test_model_training_loss_without_logits_equals_with(tie):
    """`return_logits=False` (what the trainer uses) gives the same loss and every same gradient."""
    cfg = ModelConfig(vocab_size=97, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=32, tie_embeddings=tie)
    torch.manual_seed(0)
    a = Transformer(cfg).double()
    b = Transformer(cfg).double()
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 97, (3, 11))
    y = torch.randint(0, 97, (3, 11))
    y[0, :4] = IGNORE_INDEX
    oa, ob = a(x, targets=y), b(x, targets=y, return_logits=False)
    assert ob.logits is None and oa.logits is not None
    torch.testing.assert_close(ob.lm_loss, oa.lm_loss, rtol=1e-12, atol=1e-12)
    oa.loss.backward()
    ob.loss.backward()
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-9, atol=1e-12, msg=name)
