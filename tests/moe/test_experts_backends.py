"""The experts-backend table: which backend a call takes, that each equals the loop
reference, and that a new backend plugs in with one `register_backend` call."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moelab.moe import BACKENDS, ExpertsBackend, MoE, MoEConfig, experts, register_backend

CFG = MoEConfig(d_model=32, d_expert=16, num_experts=8, top_k=2)


def _layer(cfg=CFG, seed=0) -> MoE:
    torch.manual_seed(seed)
    m = MoE(cfg)
    m.reset_parameters(std=0.2)
    return m


def test_table_picks_by_device_and_dtype():
    m = _layer()
    x32 = torch.randn(4, 32)
    assert m.experts.backend(x32).name == "segmented"
    assert m.experts.backend(x32.double()).name == "segmented"
    assert _layer(dataclasses.replace(CFG, impl="loop")).experts.backend(x32).name == "loop"
    m.experts.to(torch.bfloat16)
    assert m.experts.backend(x32).name == "cpu_bf16"
    assert {"loop", "segmented", "cpu_bf16", "cuda_grouped_mm"} <= set(BACKENDS)


@pytest.mark.parametrize("native", ["1", "0"], ids=["native_bf16", "emulated_bf16_upcast"])
@pytest.mark.parametrize("T", [1, 9, 40])
def test_cpu_bf16_backend_equals_reference_on_the_same_weights(monkeypatch, native, T):
    """bf16 expert weights in an fp32 layer: the bf16 backend (native bf16 GEMMs, or the
    float32 upcast where the CPU has none) against the loop reference on the same
    bf16-rounded weights in float64; outputs and gradients, to bf16 precision."""
    monkeypatch.setenv("MOELAB_CPU_BF16", native)
    kernel_dtypes = []
    segmented = experts.cpu_kernels.segmented_ffn
    monkeypatch.setattr(experts.cpu_kernels, "segmented_ffn",
                        lambda x, w_in, *a: kernel_dtypes.append((x.dtype, w_in.dtype)) or segmented(x, w_in, *a))
    fast = _layer()
    fast.experts.to(torch.bfloat16)
    ref = _layer(dataclasses.replace(CFG, impl="loop")).double()
    ref.load_state_dict({k: v.double() for k, v in fast.state_dict().items()})
    x = torch.randn(T, 32)
    xf, xr = x.clone().requires_grad_(True), x.double().requires_grad_(True)
    of, orf = fast(xf), ref(xr)
    assert of.output.dtype == torch.float32
    # The capability decides the arithmetic: bf16 GEMMs only where the CPU has them.
    want = torch.bfloat16 if native == "1" else torch.float32
    assert kernel_dtypes == [(want, want)]
    # bf16 rounds the expert inputs and products: ~3 significant digits.
    tol = dict(rtol=3e-2, atol=3e-2 * float(orf.output.detach().abs().max()))
    torch.testing.assert_close(of.output.double(), orf.output, **tol)
    assert torch.equal(of.stats.tokens_per_expert, orf.stats.tokens_per_expert)
    g = torch.randn(T, 32)
    (of.output * g).sum().backward()
    (orf.output * g.double()).sum().backward()
    assert fast.experts.down_proj.grad.dtype == torch.bfloat16
    for a, b in ((xf.grad, xr.grad), (fast.experts.down_proj.grad, ref.experts.down_proj.grad),
                 (fast.router.weight.grad, ref.router.weight.grad)):
        torch.testing.assert_close(a.double(), b, rtol=5e-2, atol=5e-2 * float(b.abs().max()))


def test_a_new_backend_is_one_register_call(monkeypatch):
    """A backend registered for float64 is chosen for float64 calls and nothing else."""
    calls = []

    def forward(ex, x_AD, counts_E, weight_A):
        calls.append(x_AD.shape[0])
        return BACKENDS["loop"].forward(ex, x_AD, counts_E, weight_A)

    monkeypatch.setattr(experts, "_AUTO", list(experts._AUTO))
    monkeypatch.setattr(experts, "BACKENDS", dict(experts.BACKENDS))
    register_backend(ExpertsBackend("f64_counting", forward, lambda ex, x: x.dtype == torch.float64, "test"))
    m = _layer().double()
    with torch.no_grad():
        m(torch.randn(5, 32, dtype=torch.float64))
        m.float()(torch.randn(5, 32))
    assert calls == [10]
    with pytest.raises(ValueError, match="already registered"):
        register_backend(ExpertsBackend("f64_counting", forward, lambda ex, x: False, "again"))


@pytest.mark.parametrize("unfused", [False, True])
def test_nothing_routed_keeps_the_graph_connected(monkeypatch, unfused):
    """No rows at all (an empty batch): zero-size output, and backward still reaches the
    experts (a zero gradient, not None), fused and unfused."""
    if unfused:
        from moelab.moe import LocalDispatcher

        monkeypatch.setattr(LocalDispatcher, "run_experts",
                            lambda self, ex, d: self.combine(ex(d.x_AD, d.tokens_per_expert_E, d.weight_A), d))
    m = _layer()
    x = torch.randn(0, 32, requires_grad=True)
    out = m(x)
    assert out.output.shape == (0, 32) and int(out.stats.tokens_per_expert.sum()) == 0
    out.output.sum().backward()
    assert m.experts.down_proj.grad is not None and not m.experts.down_proj.grad.any()


def test_autocast_runs_the_expert_gemms_in_its_dtype(monkeypatch):
    """Under bf16 autocast the segmented kernel gets bf16 rows and weights (autocast does not
    cast its GEMMs itself); gradients reach the fp32 parameters; the result is close to fp32."""
    kernel_dtypes = []
    segmented = experts.cpu_kernels.segmented_ffn
    monkeypatch.setattr(experts.cpu_kernels, "segmented_ffn",
                        lambda x, w_in, *a: kernel_dtypes.append((x.dtype, w_in.dtype)) or segmented(x, w_in, *a))
    m = _layer()
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        want = m(x).output
    kernel_dtypes.clear()
    xg = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(xg).output
    assert kernel_dtypes == [(torch.bfloat16, torch.bfloat16)]
    out.float().sum().backward()
    assert m.experts.gate_up_proj.grad.dtype == torch.float32 and xg.grad is not None
    torch.testing.assert_close(out.float(), want, rtol=5e-2, atol=5e-2 * float(want.abs().max()))
