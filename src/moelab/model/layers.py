"""Decoder building blocks: RMSNorm, rotary embeddings, grouped-query attention, DeepSeek's
multi-head latent attention, attention with sinks (the reference), the block.

Legend: B batch, T new tokens, S key positions (cache + new), D model dim,
H query heads, Hkv key/value heads, Dh head dim, Dv value head dim, Dr rotary dims,
R the KV latent rank (MLA).

Parameter names follow HF Llama/Mixtral (``self_attn.q_proj``, ``input_layernorm``,
``post_attention_layernorm``, ``mlp``), so checkpoint mapping is a short table.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moelab.model.cache import Cache
from moelab.model.config import ModelConfig, RopeScaling, YarnRope
from moelab.moe import FeedForward, MoE, MoEOutput


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 (bf16 mean-of-squares loses precision)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def normalize(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # F.rms_norm: the same x * rsqrt(mean(x^2) + eps) * weight as HF's Llama/Mixtral
        # RMSNorm (equal to it in tests), one fused kernel instead of five ops.
        return F.rms_norm(x, (x.shape[-1],), weight, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        return self.normalize(x.to(dtype), self.weight.to(dtype)).to(x.dtype)


class LayerNorm(RMSNorm):
    """(x - mean) / std * weight, no bias (DBRX's ``nn.LayerNorm(bias=False)``), in float32."""

    def normalize(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), weight, None, self.eps)


def block_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    """The blocks' and the final norm of `cfg` (``ModelConfig.norm``)."""
    return LayerNorm(dim, cfg.norm_eps) if cfg.norm == "layer" else RMSNorm(dim, cfg.norm_eps)


def rope_cos_sin(
    positions_BT: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype, yarn: YarnRope | None = None,
    scaling: RopeScaling | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for the given positions, ``[B, 1, T, Dh]`` (RoFormer; HF half-split layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions_BT.device, dtype=torch.float64) / head_dim))
    if yarn is not None:
        inv_freq = yarn_inv_freq(inv_freq, head_dim, theta, yarn)
    if scaling is not None:
        inv_freq = scaled_inv_freq(inv_freq, scaling)
    freqs_BTd = positions_BT.to(torch.float64).unsqueeze(-1) * inv_freq
    emb = torch.cat([freqs_BTd, freqs_BTd], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if yarn is not None and yarn.attention_factor != 1.0:
        cos, sin = cos * yarn.attention_factor, sin * yarn.attention_factor
    return cos.to(dtype).unsqueeze(1), sin.to(dtype).unsqueeze(1)


def scaled_inv_freq(inv_freq_d: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    """`RopeScaling`'s rule applied to the frequencies (its docstring)."""
    if scaling.kind == "linear":
        return inv_freq_d / scaling.factor
    orig = scaling.original_max_position_embeddings
    low_wavelen, high_wavelen = orig / scaling.low_freq_factor, orig / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq_d
    scaled = torch.where(wavelen > low_wavelen, inv_freq_d / scaling.factor, inv_freq_d)
    smooth = (orig / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def yarn_inv_freq(inv_freq_d: torch.Tensor, dim: int, theta: float, yarn: YarnRope) -> torch.Tensor:
    """YaRN's blend of extrapolated (``inv_freq``) and interpolated (``inv_freq / factor``)
    frequencies: dims that rotate more than ``beta_fast`` times over the original context
    keep their frequency, fewer than ``beta_slow`` times are interpolated, a linear ramp
    between (the "NTK-by-parts" rule, arXiv:2309.00071 eq. 17)."""

    def correction_dim(rotations: float) -> float:
        return dim * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(yarn.beta_fast), correction_dim(yarn.beta_slow)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a one-dim ramp would divide by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float64, device=inv_freq_d.device) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate
    return inv_freq_d / yarn.factor * (1 - keep) + inv_freq_d * keep


def apply_rope(x_BHTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + Dh/2) by position-dependent angles (the HF `rotate_half` layout)."""
    x1, x2 = x_BHTD.chunk(2, dim=-1)
    return x_BHTD * cos + torch.cat([-x2, x1], dim=-1) * sin


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last dim, no weight, in float32 (Llama 4's QK norm)."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope_partial(x_BHTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, interleave: bool = False) -> torch.Tensor:
    """RoPE on the first ``Dr = cos.shape[-1]`` dims of each head, the rest passed through.

    ``interleave`` (DeepSeek): the rotated dims pair as (x0, x1), (x2, x3), ...; they are
    de-interleaved to (evens | odds) and rotated in the half-split layout, as transformers
    does. Queries and keys get the same permutation, so q.k is that of the paired rotation.
    """
    Dr = cos.shape[-1]
    rot, rest = x_BHTD[..., :Dr], x_BHTD[..., Dr:]
    if interleave:
        rot = torch.cat([rot[..., 0::2], rot[..., 1::2]], dim=-1)
    rot = apply_rope(rot, cos, sin)
    return rot if rest.shape[-1] == 0 else torch.cat([rot, rest], dim=-1)


def sink_attention(
    q_BHTD: torch.Tensor,
    k_BHSD: torch.Tensor,
    v_BHSD: torch.Tensor,
    sinks_H: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
) -> torch.Tensor:
    """Attention with one sink logit per head (gpt-oss): the reference, an explicit softmax.

    p = softmax([q k^T / sqrt(Dh), s_h]) over the S keys and the sink; the sink's share is
    dropped (it has no value), so each row's weights sum to 1 - p_sink: a head can attend
    to "nothing". SDPA has no such term. ``mask``: bool ``[B, 1, T, S]`` (True = attend);
    ``is_causal``: plain causal over S == T keys when there is no mask.
    """
    B, H, T, Dh = q_BHTD.shape
    S = k_BHSD.shape[2]
    if k_BHSD.shape[1] != H:  # GQA: each K/V head serves H / Hkv query heads
        k_BHSD = k_BHSD.repeat_interleave(H // k_BHSD.shape[1], dim=1)
        v_BHSD = v_BHSD.repeat_interleave(H // v_BHSD.shape[1], dim=1)
    scores_BHTS = (q_BHTD @ k_BHSD.transpose(-1, -2)) * Dh**-0.5
    if mask is None and is_causal:
        mask = torch.ones(T, S, dtype=torch.bool, device=q_BHTD.device).tril(S - T)
    if mask is not None:
        scores_BHTS = scores_BHTS.masked_fill(~mask, float("-inf"))
    sink_BHT1 = sinks_H.to(scores_BHTS.dtype).view(1, H, 1, 1).expand(B, H, T, 1)
    probs = torch.softmax(torch.cat([scores_BHTS, sink_BHT1], dim=-1), dim=-1)[..., :S]
    return probs @ v_BHSD


def one_query_attention(
    q_BH1D: torch.Tensor, k_BKSD: torch.Tensor, v_BKSD: torch.Tensor, mask_B11S: torch.Tensor
) -> torch.Tensor:
    """SDPA for one query per row (a decode step), written as reductions: ``[B, H, 1, Dv]``.

    K = KV heads, G = H / K query heads per KV head (grouped-query attention without
    repeating K/V). Inside a compiled decode step inductor fuses this into its own C++
    loops, where SDPA is an external call (~40 us a layer at 1 thread, 8-12% of an int8
    step of the ~200M benchmark model); `F.scaled_dot_product_attention` is its reference
    (tests/model). ``mask_B11S``: boolean, True = may attend.
    """
    B, H, _, D = q_BH1D.shape
    K, S, Dv = k_BKSD.shape[1], k_BKSD.shape[2], v_BKSD.shape[-1]
    q_BKG1D = q_BH1D.reshape(B, K, H // K, 1, D)
    scores_BKGS = (q_BKG1D * k_BKSD.unsqueeze(2)).sum(-1) * D**-0.5
    scores_BKGS = scores_BKGS.masked_fill(~mask_B11S.view(B, 1, 1, S), float("-inf"))
    p_BKGS1 = torch.softmax(scores_BKGS.float(), dim=-1).to(v_BKSD.dtype).unsqueeze(-1)
    out_BKGD = (p_BKGS1 * v_BKSD.unsqueeze(2)).sum(-2)
    return out_BKGD.reshape(B, H, 1, Dv)


def attend(
    module: nn.Module,
    q_BHTD: torch.Tensor,
    k_BHTD: torch.Tensor,
    v_BHTD: torch.Tensor,
    mask: torch.Tensor | None,
    cache: Cache | None,
    window: int | None,
) -> torch.Tensor:
    """Causal attention of the new queries over the cache and the new keys: ``[B, H, T, Dv]``.

    A cache with the optional ``attend`` hook (a packed serving batch) attends itself;
    otherwise the cache stores the new K/V and SDPA runs (or the sink reference, when the
    module has ``sinks``).
    """
    T, H, Hkv = q_BHTD.shape[2], q_BHTD.shape[1], k_BHTD.shape[1]
    hook = getattr(cache, "attend", None)
    if hook is not None:
        # A packed batch (several requests' tokens in one row) attends per request itself.
        return hook(module.layer_idx, q_BHTD, k_BHTD, v_BHTD, window, getattr(module, "sinks", None))
    if cache is not None:
        k_BHTD, v_BHTD = cache.update(module.layer_idx, k_BHTD, v_BHTD)
    sinks = getattr(module, "sinks", None)
    if sinks is not None:
        return sink_attention(q_BHTD, k_BHTD, v_BHTD, sinks, mask, mask is None and T > 1)
    if T == 1 and mask is not None and torch.compiler.is_compiling():
        return one_query_attention(q_BHTD, k_BHTD, v_BHTD, mask)
    return F.scaled_dot_product_attention(
        q_BHTD, k_BHTD, v_BHTD, attn_mask=mask, is_causal=mask is None and T > 1, enable_gqa=Hkv != H
    )


class Attention(nn.Module):
    """Causal grouped-query attention via `scaled_dot_product_attention`."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        H, Hkv, Dh, D = cfg.n_heads, cfg.kv_heads, cfg.dim_head, cfg.d_model
        self.q_proj = nn.Linear(D, H * Dh, bias=cfg.attn_bias)
        self.k_proj = nn.Linear(D, Hkv * Dh, bias=cfg.attn_bias)
        self.v_proj = nn.Linear(D, Hkv * Dh, bias=cfg.attn_bias)
        self.o_proj = nn.Linear(H * Dh, D, bias=cfg.o_bias)
        if cfg.attn_sinks:
            self.sinks = nn.Parameter(torch.zeros(H))
        if cfg.qk_norm in ("head", "head_after_rope"):
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
        if self.layer_idx in cfg.nope_layers:
            pass  # NoPE (Llama 4): no positions in this layer's attention
        elif cfg.rope_dim == Dh and not cfg.rope_interleave:
            q_BHTD, k_BHTD = apply_rope(q_BHTD, cos, sin), apply_rope(k_BHTD, cos, sin)
        else:
            q_BHTD = rope_partial(q_BHTD, cos, sin, interleave=cfg.rope_interleave)
            k_BHTD = rope_partial(k_BHTD, cos, sin, interleave=cfg.rope_interleave)
        if cfg.qk_norm == "head_after_rope":
            q_BHTD, k_BHTD = self.q_norm(q_BHTD), self.k_norm(k_BHTD)
        if cfg.qk_norm == "l2" and self.layer_idx not in cfg.nope_layers:
            q_BHTD, k_BHTD = l2_norm(q_BHTD, cfg.norm_eps), l2_norm(k_BHTD, cfg.norm_eps)
        if cfg.attn_scale is not None:
            # Granite: softmax scale attn_scale instead of 1/sqrt(Dh), folded into q so every
            # attention path (SDPA, sinks, a serving batch's own attend) applies it unchanged.
            q_BHTD = q_BHTD * (cfg.attn_scale * Dh**0.5)
        y = attend(self, q_BHTD, k_BHTD, v_BHTD, mask, cache, cfg.window_of(self.layer_idx))
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * Dh))


# transformers' DeepSeek latent norms use their class default eps, not rms_norm_eps.
MLA_LATENT_NORM_EPS = 1e-6


class MLAttention(nn.Module):
    """DeepSeek-V2/V3 multi-head latent attention (MLA), in its decompressed form.

    q = W_qb norm(W_qa x) (or W_q x without a query bottleneck), split per head into a
    no-RoPE part and Dr RoPE dims; [c_kv | k_rope] = W_kva x, with c_kv (rank R) normed
    and expanded per head by W_kvb into k_nope and v, and one k_rope shared by all heads.
    Keys are [k_nope | rope(k_rope)], queries [q_nope | rope(q_rope)]; the scale is
    1/sqrt(Dh) over the whole query/key head. The cache keeps per-head K ``[.., Dh]`` and
    V ``[.., Dv]`` (DeepSeek's own kernels cache the latent instead: less memory, the same
    numbers).
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        H, Dh, Dv, Dr, D = cfg.n_heads, cfg.dim_head, cfg.value_dim, cfg.rope_dim, cfg.d_model
        R = cfg.kv_lora_rank
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * Dh, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=cfg.attn_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, MLA_LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * Dh, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, R + Dr, bias=cfg.attn_bias)
        self.kv_a_layernorm = RMSNorm(R, MLA_LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(R, H * (Dh - Dr + Dv), bias=False)
        self.o_proj = nn.Linear(H * Dv, D, bias=cfg.o_bias)

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
        H, Dh, Dv, Dr, R = cfg.n_heads, cfg.dim_head, cfg.value_dim, cfg.rope_dim, cfg.kv_lora_rank
        Dn = Dh - Dr
        if cfg.q_lora_rank is None:
            q = self.q_proj(x_BTD)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD)))
        q_BHTD = q.view(B, T, H, Dh).transpose(1, 2)
        q_nope, q_rope = q_BHTD.split([Dn, Dr], dim=-1)
        c_kv, k_rope = self.kv_a_proj_with_mqa(x_BTD).split([R, Dr], dim=-1)
        kv_BHTE = self.kv_b_proj(self.kv_a_layernorm(c_kv)).view(B, T, H, Dn + Dv).transpose(1, 2)
        k_nope, v_BHTD = kv_BHTE.split([Dn, Dv], dim=-1)
        q_rope = rope_partial(q_rope, cos, sin, interleave=cfg.rope_interleave)
        k_rope_B1TD = rope_partial(k_rope.view(B, 1, T, Dr), cos, sin, interleave=cfg.rope_interleave)
        q_BHTD = torch.cat([q_nope, q_rope], dim=-1)
        if cfg.attn_scale is not None:  # YaRN's mscale^2 on the softmax scale (DeepSeek): folded into q
            q_BHTD = q_BHTD * (cfg.attn_scale * Dh**0.5)
        k_BHTD = torch.cat([k_nope, k_rope_B1TD.expand(B, H, T, Dr)], dim=-1)
        y = attend(self, q_BHTD, k_BHTD, v_BHTD.contiguous(), mask, cache, cfg.window_of(self.layer_idx))
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * Dv))


class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + ffn(norm(x)); the FFN is dense or MoE."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.residual_multiplier = cfg.residual_multiplier
        self.input_layernorm = block_norm(cfg, cfg.d_model)
        self.self_attn = MLAttention(cfg, layer_idx) if cfg.attention == "mla" else Attention(cfg, layer_idx)
        self.post_attention_layernorm = block_norm(cfg, cfg.d_model)
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
        r = self.residual_multiplier
        a = self.self_attn(self.input_layernorm(x_BTD), cos, sin, mask, cache)
        x_BTD = x_BTD + (a if r == 1.0 else a * r)
        h = self.post_attention_layernorm(x_BTD)
        if self.is_moe:
            moe_out: MoEOutput = self.mlp(h, return_routing=return_routing, telemetry=telemetry)
            y = moe_out.output
            return x_BTD + (y if r == 1.0 else y * r), moe_out
        y = self.mlp(h)
        return x_BTD + (y if r == 1.0 else y * r), None
