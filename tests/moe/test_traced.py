"""`moelab.moe.traced`, what a compiled one-row decode step traces, against the calls it
replaces: ``F.linear`` (eagerly and inside a real compiled graph, through the
`OneRowLinears` mode), ``argsort`` and the running sum of the counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moelab.moe import traced


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bias", [False, True])
def test_one_row_linear_equals_f_linear(dtype, bias):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 24, generator=g).to(dtype)
    b = torch.randn(40, generator=g).to(dtype) if bias else None
    x = torch.randn(1, 1, 24, generator=g).to(dtype)
    got = traced.one_row_linear(x, w, b)
    assert got.shape == (1, 1, 40) and got.dtype == dtype
    tol = {torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}.get(dtype, {})
    torch.testing.assert_close(got, F.linear(x, w, b), **tol)


def test_rows_matvec_uses_each_rows_matrix_and_scale():
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-127, 128, (3, 5, 8), generator=g, dtype=torch.int8)
    s = torch.rand(3, 5, generator=g)
    x = torch.randn(3, 8, generator=g)
    want = torch.stack([(q[r].float() @ x[r]) * s[r] for r in range(3)])
    torch.testing.assert_close(traced.rows_matvec(x, q, s), want)


@pytest.mark.slow
def test_one_row_linears_mode_in_a_compiled_graph():
    """Inside a real compiled graph the mode replaces one-row linears (bias or not) and
    leaves others (two rows) to ``F.linear``: the same numbers either way."""
    torch.manual_seed(0)
    lin1, lin2 = torch.nn.Linear(24, 48), torch.nn.Linear(48, 16, bias=False)

    def f(x):
        with traced.OneRowLinears():
            return lin2(torch.relu(lin1(x)))

    run = torch.compile(f, fullgraph=True, dynamic=False)
    with torch.no_grad():
        for rows in (1, 2):
            x = torch.randn(rows, 24)
            torch.testing.assert_close(run(x), lin2(torch.relu(lin1(x))), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("counts", [[0, 1, 0, 1], [2, 0, 0, 0], [1, 2, 0, 1], [0, 0, 0, 3]])
def test_expert_of_rows_matches_repeat_interleave(counts):
    counts_E = torch.tensor(counts)
    A = int(counts_E.sum())
    want = torch.repeat_interleave(torch.arange(len(counts)), counts_E)
    assert torch.equal(traced.expert_of_rows(counts_E, A), want)


@pytest.mark.parametrize("kw", [dict(bias=True, activation="swiglu_oai"), dict(weight_on_input=True),
                                dict(bias=True, activation="gelu")], ids=["gpt-oss", "llama4", "bias-gelu"])
def test_traced_reference_experts_equal_the_loop(kw):
    """Experts only the loop runs (biases, gpt-oss's clamped GLU, Llama 4's weight on the
    input), per row with their own expert's weights (`experts._traced_reference`, what a
    compiled graph runs): the loop's output."""
    from moelab.moe import experts as ex

    torch.manual_seed(0)
    act = kw.pop("activation", "swiglu")
    e = ex.RoutedExperts(16, 8, 4, act, **kw).double()
    with torch.no_grad():
        for p in e.parameters():
            p.normal_(0, 0.5)
    counts_E = torch.tensor([1, 0, 2, 1])
    x_AD = torch.randn(4, 16, dtype=torch.float64)
    w_A = torch.rand(4, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ex._traced_reference(e, x_AD, counts_E, w_A), ex._loop_forward(e, x_AD, counts_E, w_A))
