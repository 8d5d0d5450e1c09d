"""Equivalences with known layers: a 1-expert MoE is a dense FFN; HF MoE blocks with copied weights.

HF routers compute softmax/sigmoid in float32 even when the block runs in float64, so
float64 comparisons with HF are limited to ~1e-7 relative; in float32 both sides agree
to ~1e-6. HF blocks are compared with the fast path only; the loop path equals it
(test_moe_fast_vs_reference).
"""

from __future__ import annotations

import pytest
import torch

from moelab.moe import FeedForward, MoE, MoEConfig

transformers = pytest.importorskip("transformers")


def _init(module: torch.nn.Module, std: float = 0.2) -> None:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)


@pytest.mark.parametrize("impl", ["grouped", "loop"])
def test_one_expert_moe_equals_dense_swiglu(impl):
    """E=1, K=1, renormalised softmax: the weight is exactly 1, so MoE == dense FFN."""
    D, F = 16, 24
    moe = MoE(MoEConfig(d_model=D, d_expert=F, num_experts=1, top_k=1, impl=impl)).double()
    moe.reset_parameters(std=0.3)
    dense = FeedForward(D, F).double()
    with torch.no_grad():
        dense.gate_proj.weight.copy_(moe.experts.gate_up_proj[0, :F])
        dense.up_proj.weight.copy_(moe.experts.gate_up_proj[0, F:])
        dense.down_proj.weight.copy_(moe.experts.down_proj[0])
    x = torch.randn(3, 5, D, dtype=torch.float64, requires_grad=True)
    out = moe(x)
    torch.testing.assert_close(out.output, dense(x), rtol=1e-12, atol=1e-12)
    # Gradients too: the expert's weights get the dense FFN's gradient.
    out.output.square().sum().backward()
    dense(x.detach()).square().sum().backward()
    torch.testing.assert_close(moe.experts.down_proj.grad[0], dense.down_proj.weight.grad)
    torch.testing.assert_close(moe.experts.gate_up_proj.grad[0, :F], dense.gate_proj.weight.grad)
    assert float(out.stats.dropped) == 0 and out.stats.tokens_per_expert.tolist() == [15]


def _mixtral_block(D=32, F=16, E=8, K=2):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(
        hidden_size=D,
        intermediate_size=F,
        num_local_experts=E,
        num_experts_per_tok=K,
        router_jitter_noise=0.0,
    )
    block = MixtralSparseMoeBlock(cfg).eval()
    _init(block)
    return block


def _ours_from_mixtral(block, impl: str) -> MoE:
    e = block.experts
    ours = MoE(
        MoEConfig(
            d_model=e.hidden_dim,
            d_expert=e.intermediate_dim,
            num_experts=e.num_experts,
            top_k=block.top_k,
            router="softmax",
            norm_topk_prob=True,
            impl=impl,
        )
    )
    with torch.no_grad():
        ours.router.weight.copy_(block.gate.weight)
        ours.experts.gate_up_proj.copy_(e.gate_up_proj)  # same [E, 2F, D] layout, gate rows first
        ours.experts.down_proj.copy_(e.down_proj)
    return ours.eval()


def test_mixtral_sparse_moe_block_parity(impl="grouped"):
    block = _mixtral_block()
    ours = _ours_from_mixtral(block, impl)
    x = torch.randn(2, 13, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x).output, block(x), rtol=1e-5, atol=1e-6)
        # float64: HF's softmax runs in float32, which bounds the agreement.
        block64, ours64, x64 = block.double(), ours.double(), x.double()
        torch.testing.assert_close(ours64(x64).output, block64(x64), rtol=1e-6, atol=1e-7)


def test_mixtral_parity_of_gradients():
    block = _mixtral_block()
    ours = _ours_from_mixtral(block, "grouped")
    x = torch.randn(1, 21, 32)
    xo, xh = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    g = torch.randn(1, 21, 32)
    (ours(xo).output * g).sum().backward()
    (block(xh) * g).sum().backward()
    # fp32 on both sides, summed over tokens in different orders: agreement is bounded by
    # roundoff relative to each gradient's scale (router grads reach ~10 here), not by a
    # fixed absolute floor.
    pairs = {
        "x": (xo.grad, xh.grad),
        "gate_up_proj": (ours.experts.gate_up_proj.grad, block.experts.gate_up_proj.grad),
        "down_proj": (ours.experts.down_proj.grad, block.experts.down_proj.grad),
        "router": (ours.router.weight.grad, block.gate.weight.grad),
    }
    for name, (got, want) in pairs.items():
        scale = float(want.abs().max())
        assert scale > 0, name
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * scale, msg=lambda m, n=name: f"{n}: {m}")


def test_qwen2_moe_sparse_block_parity(impl="grouped"):
    """Qwen2-MoE: raw (not renormalised) top-k softmax weights + a sigmoid-gated shared expert."""
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    D, F, Fs, E, K = 32, 16, 40, 8, 2
    cfg = Qwen2MoeConfig(
        hidden_size=D,
        moe_intermediate_size=F,
        shared_expert_intermediate_size=Fs,
        num_experts=E,
        num_experts_per_tok=K,
        norm_topk_prob=False,
    )
    block = Qwen2MoeSparseMoeBlock(cfg).eval()
    _init(block)
    ours = MoE(
        MoEConfig(
            d_model=D,
            d_expert=F,
            num_experts=E,
            top_k=K,
            norm_topk_prob=False,
            impl=impl,
            num_shared_experts=1,
            d_shared_expert=Fs,
            shared_expert_gate=True,
        )
    ).eval()
    with torch.no_grad():
        ours.router.weight.copy_(block.gate.weight)
        ours.experts.gate_up_proj.copy_(block.experts.gate_up_proj)
        ours.experts.down_proj.copy_(block.experts.down_proj)
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(ours.shared_experts, name).weight.copy_(
                getattr(block.shared_expert, name).weight
            )
        ours.shared_expert_gate.weight.copy_(block.shared_expert_gate.weight)
        x = torch.randn(2, 11, D)
        torch.testing.assert_close(ours(x).output, block(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            ours.double()(x.double()).output, block.double()(x.double()), rtol=1e-6, atol=1e-7
        )


def test_deepseek_v3_moe_parity_group_limited_sigmoid(impl="grouped"):
    """DeepSeek-V3: sigmoid affinities, selection bias, n_group=4 / topk_group=2, scaling 2.5.

    Masking of non-selected groups: this transformers version masks them with -inf, as we
    do. Older ports filled them with 0.0, which differs from -inf only when every biased
    score in the kept groups is negative (a 0 from a masked group could then win); the
    small positive-mean bias used here keeps all biased scores positive, so the test also
    holds against the 0.0 variant.
    """
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    D, F, E, K = 32, 16, 16, 4
    cfg = DeepseekV3Config(
        hidden_size=D,
        moe_intermediate_size=F,
        n_routed_experts=E,
        num_experts_per_tok=K,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
    )
    block = DeepseekV3MoE(cfg).eval()
    _init(block)
    with torch.no_grad():
        block.gate.e_score_correction_bias.copy_(0.05 + 0.05 * torch.rand(E))
    ours = MoE(
        MoEConfig(
            d_model=D,
            d_expert=F,
            num_experts=E,
            top_k=K,
            router="sigmoid",
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            num_shared_experts=1,
            impl=impl,
        )
    ).eval()
    with torch.no_grad():
        ours.router.weight.copy_(block.gate.weight)
        ours.router.expert_bias.copy_(block.gate.e_score_correction_bias)
        ours.experts.gate_up_proj.copy_(block.experts.gate_up_proj)
        ours.experts.down_proj.copy_(block.experts.down_proj)
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(ours.shared_experts, name).weight.copy_(
                getattr(block.shared_experts, name).weight
            )
        x = torch.randn(2, 15, D)
        torch.testing.assert_close(ours(x).output, block(x), rtol=1e-5, atol=1e-6)
