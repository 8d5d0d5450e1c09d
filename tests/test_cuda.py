"""CUDA paths: the same maths on the GPU as on the CPU. Skipped where there is no GPU
(CI has none); run on a CUDA machine with ``pytest tests/test_cuda.py``.

* The grouped MoE fast path on CUDA equals the per-expert loop reference (fp32), forward
  and gradients, for every router family.
* A CUDA training run with ``precision="fp32"`` follows the CPU run's loss curve; the
  default ``"auto"`` (bf16 autocast) trains too and stays close.
* Generation on CUDA gives the CPU's greedy tokens, batched with left padding.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moelab.data import prepare_data
from moelab.infer.generate import generate
from moelab.model import ModelConfig, Transformer
from moelab.moe import MoE, MoEConfig
from moelab.train import TrainConfig, train
from moelab.train.metrics import read_metrics

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

VOCAB = 512


def _tiny_moe_model(vocab: int = VOCAB, **moe_changes) -> ModelConfig:
    moe = MoEConfig(**{"d_model": 32, "d_expert": 32, "num_experts": 4, "top_k": 2, "aux_loss_coef": 0.01,
                       "z_loss_coef": 0.001, **moe_changes})
    return ModelConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64,
                       max_seq_len=64, moe=moe)


@pytest.fixture(autouse=True)
def _exact_fp32():
    # TF32 matmuls would make "fp32 on CUDA == fp32 on CPU" a 1e-3 comparison.
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


ROUTERS = {
    "softmax": dict(router="softmax", norm_topk_prob=True),
    "sigmoid_groups": dict(router="sigmoid", n_group=2, topk_group=1, routed_scaling_factor=2.5),
    "shared": dict(router="softmax", num_shared_experts=1, d_shared_expert=48),
    "capacity": dict(router="softmax", capacity_factor=1.0),
}


@pytest.mark.parametrize("router", list(ROUTERS))
@pytest.mark.parametrize("T", [1, 7, 300])
def test_moe_fast_path_equals_reference_on_cuda(router, T):
    cfg = MoEConfig(d_model=64, d_expert=96, num_experts=8, top_k=2, **ROUTERS[router])
    torch.manual_seed(0)
    fast = MoE(dataclasses.replace(cfg, impl="grouped")).cuda()
    fast.reset_parameters(std=0.3)
    ref = MoE(dataclasses.replace(cfg, impl="loop")).cuda()
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(2, T, 64, device="cuda")
    xf, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    of, orf = fast(xf), ref(xr)
    _close(of.output, orf.output, "output")
    torch.testing.assert_close(of.aux_loss, orf.aux_loss, rtol=1e-4, atol=1e-6)
    assert torch.equal(of.stats.tokens_per_expert.cpu(), orf.stats.tokens_per_expert.cpu())
    g = torch.randn_like(of.output)
    (of.output * g).sum().backward()
    (orf.output * g).sum().backward()
    _close(xf.grad, xr.grad, "x")
    for (name, pf), pr in zip(fast.named_parameters(), ref.parameters(), strict=True):
        _close(pf.grad, pr.grad, name)


def _close(a: torch.Tensor, b: torch.Tensor, name: str, tol: float = 1e-5) -> None:
    # fp32 sums of hundreds of rows in different orders: compare against the tensor's
    # scale, not element by element (a tiny element's relative error means nothing).
    a, b = a.detach(), b.detach()
    err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
    assert err < tol, f"{name}: max |diff| / max |ref| = {err:.2e}"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepare_data(tmp_path_factory.mktemp("cuda-data"), max_chars_per_domain=40_000, vocab_size=VOCAB)


def _run(data, out, **train_changes):
    cfg = TrainConfig(steps=12, batch_size=4, seq_len=32, lr=1e-2, warmup_steps=2, eval_interval=6,
                      eval_batches=1, checkpoint_interval=0, log_interval=4, **train_changes)
    result = train(_tiny_moe_model(), cfg, data, out, progress=False, tensorboard=False)
    return result, [r["loss"] for r in read_metrics(out, kind="train")]


def test_cuda_fp32_training_follows_cpu(data, tmp_path):
    _, cpu = _run(data, tmp_path / "cpu", device="cpu")
    _, gpu = _run(data, tmp_path / "gpu", device="cuda", precision="fp32")
    # Same batches, same init (built on CPU after seeding, then moved): only reduction
    # order differs, and chaotic growth over 12 steps stays far below this.
    assert max(abs(a - b) for a, b in zip(cpu, gpu, strict=True)) < 2e-3


def test_cuda_bf16_autocast_trains(data, tmp_path):
    result, gpu = _run(data, tmp_path / "bf16", device="cuda")  # precision auto = bf16 autocast on CUDA
    _, cpu = _run(data, tmp_path / "cpu", device="cpu")
    assert result.stopped_reason is None and result.steps_done == 12
    assert gpu[-1] < gpu[0]
    assert max(abs(a - b) for a, b in zip(cpu, gpu, strict=True)) < 0.2


def test_cuda_generation_equals_cpu_greedy():
    torch.manual_seed(0)
    model = Transformer(_tiny_moe_model(vocab=97)).eval()
    prompts = [[5, 9, 1, 33, 2, 7], [11, 4], [60, 3, 3, 8, 21, 13, 40, 2, 17]]
    cpu = generate(model, prompts, max_new_tokens=8)
    gpu = generate(model.cuda(), prompts, max_new_tokens=8)
    assert gpu.token_ids == cpu.token_ids


@pytest.mark.parametrize("T", [1, 7, 300])
def test_cuda_grouped_mm_backend_equals_reference(T):
    """bf16 experts on CUDA take `cuda_grouped_mm` (where this build/GPU runs it): equal to
    the float64 loop reference on the same bf16 weights, outputs and gradients."""
    cfg = MoEConfig(d_model=64, d_expert=96, num_experts=8, top_k=2)
    torch.manual_seed(0)
    fast = MoE(cfg).cuda()
    fast.reset_parameters(std=0.2)
    fast.experts.to(torch.bfloat16)
    ref = MoE(dataclasses.replace(cfg, impl="loop")).cuda().double()
    ref.load_state_dict({k: v.double() for k, v in fast.state_dict().items()})
    x = torch.randn(T, 64, device="cuda")
    name = fast.experts.backend(x).name
    if name != "cuda_grouped_mm":
        pytest.skip(f"torch._grouped_mm does not run here (backend {name})")
    xf, xr = x.clone().requires_grad_(True), x.double().requires_grad_(True)
    of, orf = fast(xf).output, ref(xr).output
    scale = float(orf.detach().abs().max())
    torch.testing.assert_close(of.double(), orf, rtol=3e-2, atol=3e-2 * scale)
    g = torch.randn_like(x)
    (of * g).sum().backward()
    (orf * g.double()).sum().backward()
    for a, b in ((xf.grad, xr.grad), (fast.experts.down_proj.grad, ref.experts.down_proj.grad)):
        torch.testing.assert_close(a.double(), b, rtol=5e-2, atol=5e-2 * float(b.abs().max()))
