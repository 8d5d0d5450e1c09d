"""Decoder building blocks: RMSNorm, rotary embeddings, grouped-query attention, the block.

Legend: B batch, T new tokens, S key positions (cache + new), D model dim,
H query heads, Hkv key/value heads, Dh head dim.

Parameter names follow HF Llama/Mixtral (``self_attn.q_proj``, ``input_layernorm``,
``post_attention_layernorm``, ``mlp``), so checkpoint mapping is a short table.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moelab.model.cache import Cache
from moelab.model.config import ModelConfig
from moelab.moe import FeedForward, MoE, MoEOutput


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 (bf16 mean-of-squares loses precision)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        # F.rms_norm: the same x * rsqrt(mean(x^2) + eps) * weight as HF's Llama/Mixtral
        # RMSNorm (equal to it in tests), one fused kernel instead of five ops.
        return F.rms_norm(x.to(dtype), (x.shape[-1],), self.weight.to(dtype), self.eps).to(x.dtype)


def rope_cos_sin(
    positions_BT: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for the given positions, ``[B, 1, T, Dh]`` (RoFormer; HF half-split layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions_BT.device, dtype=torch.float64) / head_dim))
    freqs_BTd = positions_BT.to(torch.float64).unsqueeze(-1) * inv_freq
    emb = torch.cat([freqs_BTd, freqs_BTd], dim=-1)
    return emb.cos().to(dtype).unsqueeze(1), emb.sin().to(dtype).unsqueeze(1)


def apply_rope(x_BHTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + Dh/2) by position-dependent angles (the HF `rotate_half` layout)."""
    x1, x2 = x_BHTD.chunk(2, dim=-1)
    return x_BHTD * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    """Causal grouped-query attention via `scaled_dot_product_attention`."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        H, Hkv, Dh, D = cfg.n_heads, cfg.kv_heads, cfg.dim_head, cfg.d_model
        self.q_proj = nn.Linear(D, H * Dh, bias=cfg.attn_bias)
        self.k_proj = nn.Linear(D, Hkv * Dh, bias=cfg.attn_bias)
        self.v_proj = nn.Linear(D, Hkv * Dh, bias=cfg.attn_bias)
        self.o_proj = nn.Linear(H * Dh, D, bias=False)
        if cfg.qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(Dh, cfg.norm_eps), RMSNorm(Dh, cfg.norm_eps)
        elif cfg.qk_norm == "full":
            self.q_norm, self.k_norm = RMSNorm(H * Dh, cfg.norm_eps), RMSNorm(Hkv * Dh, cfg.norm_eps)

    def forward(
        self,
        x_BTD: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        cfg = self.cfg
        B, T, _ = x_BTD.shape
        H, Hkv, Dh = cfg.n_heads, cfg.kv_heads, cfg.dim_head
        q, k, v = self.q_proj(x_BTD), self.k_proj(x_BTD), self.v_proj(x_BTD)
        if cfg.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if cfg.clip_qkv is not None:
            c = cfg.clip_qkv
            q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
        q_BHTD = q.view(B, T, H, Dh).transpose(1, 2)
        k_BHTD = k.view(B, T, Hkv, Dh).transpose(1, 2)
        v_BHTD = v.view(B, T, Hkv, Dh).transpose(1, 2)
        if cfg.qk_norm == "head":
            q_BHTD, k_BHTD = self.q_norm(q_BHTD), self.k_norm(k_BHTD)
        q_BHTD, k_BHTD = apply_rope(q_BHTD, cos, sin), apply_rope(k_BHTD, cos, sin)
        attend = getattr(cache, "attend", None)
        if attend is not None:
            # A packed batch (several requests' tokens in one row) attends per request itself.
            y = attend(self.layer_idx, q_BHTD, k_BHTD, v_BHTD, cfg.sliding_window)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, H * Dh))
        if cache is not None:
            k_BHTD, v_BHTD = cache.update(self.layer_idx, k_BHTD, v_BHTD)
        y = F.scaled_dot_product_attention(
            q_BHTD,
            k_BHTD,
            v_BHTD,
            attn_mask=mask,
            is_causal=mask is None and T > 1,
            enable_gqa=Hkv != H,
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * Dh))


class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + ffn(norm(x)); the FFN is dense or MoE."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp: nn.Module = MoE(cfg.moe) if self.is_moe else FeedForward(cfg.d_model, cfg.d_ff)

    def forward(
        self,
        x_BTD: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: Cache | None = None,
        *,
        return_routing: bool = False,
        telemetry: bool = True,
    ) -> tuple[torch.Tensor, MoEOutput | None]:
        x_BTD = x_BTD + self.self_attn(self.input_layernorm(x_BTD), cos, sin, mask, cache)
        h = self.post_attention_layernorm(x_BTD)
        if self.is_moe:
            moe_out: MoEOutput = self.mlp(h, return_routing=return_routing, telemetry=telemetry)
            return x_BTD + moe_out.output, moe_out
        return x_BTD + self.mlp(h), None
