"""`Transformer`: the Mixtral-style decoder, dense or MoE per layer.

Legend: B batch, T tokens, S key positions, D model dim, V vocab.

`forward` returns a `ModelOutput` with logits, the MoE losses summed over layers (each
layer's loss computed on its own routing; see `load_balancing_loss`), per-layer routing
stats and, on request, per-token routing decisions for analysis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from moelab.model.cache import Cache, prefix_attention_mask
from moelab.model.config import ModelConfig
from moelab.model.layers import Block, MLAttention, block_norm, rope_cos_sin
from moelab.model.lm_loss import chunked_lm_loss, lm_loss_reference
from moelab.moe import FeedForward, MoE, RoutingDecision, RoutingStats


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # [B, T, V]; None when called with return_logits=False
    aux_loss: torch.Tensor  # sum over MoE layers of the unweighted balance loss
    z_loss: torch.Tensor  # sum over MoE layers of the unweighted router z-loss
    moe_loss: torch.Tensor  # sum over MoE layers of aux_coef * aux + z_coef * z
    layer_stats: dict[int, RoutingStats] = field(default_factory=dict)  # layer index -> stats
    routing: dict[int, RoutingDecision] | None = None  # layer index -> decisions
    lm_loss: torch.Tensor | None = None  # mean next-token cross-entropy, when targets given

    @property
    def loss(self) -> torch.Tensor:
        """What training minimises: LM loss plus the weighted MoE losses."""
        if self.lm_loss is None:
            raise ValueError("ModelOutput.loss needs targets: call model(input_ids, targets=...)")
        return self.lm_loss + self.moe_loss


def _ids_in_range(input_ids: torch.Tensor, vocab_size: int) -> bool:
    lo, hi = torch.aminmax(input_ids)  # one host sync, not two
    return int(lo) >= 0 and int(hi) < vocab_size


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = block_norm(cfg, cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2/nanoGPT init: N(0, std); residual output projections scaled by 1/sqrt(2L)
        so the residual stream's variance does not grow with depth."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.embed_tokens.weight, std=std)
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std)
        for block in self.layers:
            attn = block.self_attn
            if isinstance(attn, MLAttention):
                names = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")
                inputs = [getattr(attn, n) for n in names if hasattr(attn, n)]
            else:
                inputs = [attn.q_proj, attn.k_proj, attn.v_proj]
            for lin in inputs:
                nn.init.normal_(lin.weight, std=std)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
            nn.init.normal_(attn.o_proj.weight, std=out_std)
            if attn.o_proj.bias is not None:
                nn.init.zeros_(attn.o_proj.bias)
            if isinstance(block.mlp, MoE | FeedForward):
                block.mlp.reset_parameters(std, out_std)

    @property
    def moe_layers(self) -> list[MoE]:
        return [b.mlp for b in self.layers if b.is_moe]

    def num_params(self) -> int:
        """Unique parameters (a tied head counted once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        return_routing: bool = False,
        last_only: bool = False,
        logits_at: torch.Tensor | None = None,
        telemetry: bool = True,
        return_logits: bool = True,
    ) -> ModelOutput:
        """Run the decoder: training, prefill, eager decode and the compiled static decode.

        input_ids ``[B, T]``; targets ``[B, T]`` (next tokens, -100 ignored) for ``lm_loss``;
        positions ``[B, T]`` (default: the cache's next columns, 0..T-1 without one);
        attention_mask ``[B, S]`` with 1 for real tokens over cached + new positions (left
        padding; a `StaticKVCache` holds its own); cache: any `moelab.model.cache.Cache`,
        which this call writes to and advances; last_only: logits for the last position
        only; logits_at ``[P]``: logits for these positions along T only (a serving
        engine's packed batch: the last token of each request); telemetry=False (generation): no MoE losses (returned as 0) and no
        ``layer_stats``; return_logits=False with targets (training): ``lm_loss`` by
        `chunked_lm_loss`, no ``logits`` (None) -- the same loss and gradients without the
        [B, T, V] tensor. Inside a compiled graph the input checks (host syncs) are skipped:
        the compiled step's inputs come from `generate`, which checked them.
        """
        cfg = self.cfg
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if not torch.compiler.is_compiling():
            self._check_inputs(input_ids, targets, cache)
        if positions is None:
            positions = cache.positions(B, T) if cache is not None else None
            if positions is None and cache is not None:
                raise ValueError(f"{type(cache).__name__} needs positions= (left padding makes them differ from columns)")
            if positions is None:
                positions = torch.arange(T, device=input_ids.device).unsqueeze(0).expand(B, T)
        x = self.embed_tokens(input_ids)
        if cfg.embedding_multiplier != 1.0:
            x = x * cfg.embedding_multiplier
        cos, sin = self._rope(positions, cache, x.dtype)
        # One mask per distinct window (gpt-oss alternates sliding and full layers).
        masks: dict[int | None, torch.Tensor | None] = {}
        for window in cfg.windows:
            if cache is not None:
                masks[window] = cache.attention_mask(B, T, window, attention_mask)
            else:
                masks[window] = prefix_attention_mask(B, T, 0, window, attention_mask, input_ids.device)

        zero = x.new_zeros((), dtype=torch.float32)
        aux, z, moe_loss = zero, zero, zero
        stats: dict[int, RoutingStats] = {}
        routing: dict[int, RoutingDecision] | None = {} if return_routing else None
        for i, block in enumerate(self.layers):
            mask = masks[cfg.window_of(i)]
            x, moe_out = block(x, cos, sin, mask, cache, return_routing=return_routing, telemetry=telemetry)
            if moe_out is not None and telemetry:
                aux = aux + moe_out.aux_loss
                z = z + moe_out.z_loss
                moe_loss = moe_loss + moe_out.loss
                stats[i] = moe_out.stats
            if moe_out is not None and routing is not None and moe_out.routing is not None:
                routing[i] = moe_out.routing
        if cache is not None:
            cache.advance(T)
        if last_only:
            x = x[:, -1:]
        elif logits_at is not None:
            x = x[:, logits_at]
        x = self.norm(x)
        if cfg.logits_scaling != 1.0:
            x = x / cfg.logits_scaling  # logits / s, also on the loss-only path
        if targets is not None and not return_logits:
            # Training: the loss straight from the hidden states, logits never materialised.
            lm_loss = chunked_lm_loss(x.reshape(-1, x.shape[-1]), self.lm_head.weight, targets.reshape(-1))
            return ModelOutput(None, aux, z, moe_loss, stats, routing, lm_loss)
        logits = self.lm_head(x)
        lm_loss = None
        if targets is not None:
            lm_loss = lm_loss_reference(logits.view(-1, logits.shape[-1]), targets.reshape(-1))
        return ModelOutput(logits, aux, z, moe_loss, stats, routing, lm_loss)

    def _check_inputs(self, input_ids: torch.Tensor, targets: torch.Tensor | None, cache: Cache | None) -> None:
        cfg = self.cfg
        T = input_ids.shape[1]
        offset = getattr(cache, "length", 0) if cache is not None else 0
        if offset + T > cfg.max_seq_len:
            raise ValueError(f"sequence of {offset + T} tokens exceeds ModelConfig.max_seq_len={cfg.max_seq_len}")
        if T and not _ids_in_range(input_ids, cfg.vocab_size):
            raise ValueError(f"input_ids must be in [0, vocab_size={cfg.vocab_size})")
        if targets is not None:
            if targets.shape != input_ids.shape:
                raise ValueError(f"targets must have the shape of input_ids {tuple(input_ids.shape)}, "
                                 f"got {tuple(targets.shape)}")
            real = targets[targets != -100]
            if real.numel() and not _ids_in_range(real, cfg.vocab_size):
                raise ValueError(f"targets must be in [0, vocab_size={cfg.vocab_size}) or -100 (ignored)")

    def _rope(self, positions_BT: torch.Tensor, cache: Cache | None, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[B, 1, T, Dh]``. With a cache, rows of a table over the cache's positions
        built once per cache (the same values: same function, same dtype); decode then costs
        one gather instead of float64 cos/sin, which ATen runs multithreaded even for a few
        hundred elements (~0.4 ms per step at batch 8 on the 2-core machine, measured)."""
        cfg = self.cfg
        # Positions past the table (caller-chosen positions can exceed the cache length)
        # are computed directly: one host sync per call for the check (not in a compiled
        # graph, whose positions `generate` keeps inside its static cache).
        if cache is None or (not torch.compiler.is_compiling() and int(positions_BT.max()) >= cache.max_len):
            return rope_cos_sin(positions_BT, cfg.rope_dim, cfg.rope_theta, dtype, cfg.rope_yarn, cfg.rope_scaling)
        cos_SD, sin_SD = self.rope_table(cache, dtype)
        return cos_SD[positions_BT].unsqueeze(1), sin_SD[positions_BT].unsqueeze(1)

    def rope_table(self, cache: Cache, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[S, Dh]`` for positions 0..S-1 of `cache`, built once and kept on it."""
        if cache.rope is None or cache.rope[0].dtype != dtype:
            all_pos = torch.arange(cache.max_len, device=cache.device).unsqueeze(0)
            cos, sin = rope_cos_sin(all_pos, self.cfg.rope_dim, self.cfg.rope_theta, dtype, self.cfg.rope_yarn,
                                    self.cfg.rope_scaling)
            cache.rope = (cos[0, 0], sin[0, 0])
        return cache.rope
