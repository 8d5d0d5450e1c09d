"""Named model presets, all in one place.

Matched pairs for the MoE-vs-dense comparison: a ``*-dense`` preset's FFN width equals
the MoE's *active* FFN width (top_k * d_expert + shared), so both spend the same FLOPs
per token; a ``*-dense-total`` preset's FFN width equals all experts together, so it
holds (about) the MoE's total parameters at E/K times the FFN compute.
"""

from __future__ import annotations

from moelab.errors import ConfigError
from moelab.model.config import ModelConfig
from moelab.moe.config import MoEConfig, active_ffn_hidden


def _moe_family(name: str, *, d_model: int, n_layers: int, n_heads: int, n_kv_heads: int,
                num_experts: int, top_k: int, d_expert: int, vocab_size: int,
                max_seq_len: int) -> dict[str, ModelConfig]:
    moe = MoEConfig(d_model=d_model, d_expert=d_expert, num_experts=num_experts, top_k=top_k,
                    aux_loss_coef=0.01, z_loss_coef=0.001)
    base = ModelConfig(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                       n_kv_heads=n_kv_heads, d_ff=active_ffn_hidden(moe), max_seq_len=max_seq_len)
    return {
        f"{name}-moe": base.with_(moe=moe),
        f"{name}-dense": base,
        f"{name}-dense-total": base.with_(d_ff=num_experts * d_expert),
    }


PRESETS: dict[str, ModelConfig] = {
    # ~4 M parameters total, trains at a few steps/s on 2 CPU cores.
    **_moe_family("tiny", d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, num_experts=8, top_k=2,
                  d_expert=256, vocab_size=8192, max_seq_len=512),
    # ~20 M parameters: minutes per hundred steps on CPU.
    **_moe_family("small", d_model=256, n_layers=6, n_heads=8, n_kv_heads=4, num_experts=8, top_k=2,
                  d_expert=512, vocab_size=8192, max_seq_len=1024),
    # Fine-grained: 32 small experts, top-4, one shared expert (DeepSeekMoE style).
    "tiny-finegrained-moe": ModelConfig(
        vocab_size=8192, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=512, max_seq_len=512,
        moe=MoEConfig(d_model=128, d_expert=64, num_experts=32, top_k=4, num_shared_experts=1,
                      d_shared_expert=256, aux_loss_coef=0.01, z_loss_coef=0.001),
    ),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None
