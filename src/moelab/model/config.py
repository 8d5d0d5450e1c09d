"""`ModelConfig`: a Mixtral-style decoder (dense, MoE, or mixed per layer)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

from moelab.errors import ConfigError
from moelab.moe.config import MoEConfig

QK_NORMS = (None, "head", "full", "l2", "head_after_rope")
NORMS = ("rms", "layer")  # the blocks' and the final norm: RMSNorm, or LayerNorm without bias (DBRX)
ATTENTIONS = ("gqa", "mla")


@dataclass(frozen=True, kw_only=True)
class YarnRope:
    """YaRN RoPE scaling (Peng et al. 2023, arXiv:2309.00071), as transformers computes it.

    Frequencies are interpolated by ``factor`` below the ``beta_slow`` rotations (over the
    ``original_max_position_embeddings`` the model was trained at) and kept above
    ``beta_fast``, with a linear ramp between (bounds rounded out when ``truncate``);
    cos/sin are multiplied by ``attention_factor`` (the "mscale" temperature).
    """

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float = 1.0

    def __post_init__(self) -> None:
        for name in ("factor", "beta_fast", "beta_slow", "attention_factor"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"YarnRope.{name} must be a finite number > 0, got {value!r}")
        if not isinstance(self.original_max_position_embeddings, int) or self.original_max_position_embeddings <= 0:
            raise ConfigError("YarnRope.original_max_position_embeddings must be a positive integer, "
                              f"got {self.original_max_position_embeddings!r}")


ROPE_SCALINGS = ("linear", "llama3")


@dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """RoPE frequency scaling other than YaRN, as transformers computes it (its rope_type):

    - ``"linear"`` (position interpolation, Chen et al. 2023): every frequency / ``factor``.
    - ``"llama3"`` (Llama 3.1, Llama 4): by wavelength over the
      ``original_max_position_embeddings`` context: wavelengths longer than
      original / ``low_freq_factor`` are divided by ``factor``, shorter than original /
      ``high_freq_factor`` kept, a smooth blend between.
    """

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.kind not in ROPE_SCALINGS:
            raise ConfigError(f"RopeScaling.kind={self.kind!r} is unknown; choose one of {ROPE_SCALINGS}")
        for name in ("factor", "low_freq_factor", "high_freq_factor"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"RopeScaling.{name} must be a finite number > 0, got {value!r}")
        if self.kind == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ConfigError(f"RopeScaling: llama3 needs high_freq_factor > low_freq_factor, got "
                              f"{self.high_freq_factor!r} <= {self.low_freq_factor!r}")
        if not isinstance(self.original_max_position_embeddings, int) or self.original_max_position_embeddings <= 0:
            raise ConfigError("RopeScaling.original_max_position_embeddings must be a positive integer, "
                              f"got {self.original_max_position_embeddings!r}")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Decoder-only transformer: embeddings, pre-norm blocks (RMSNorm, RoPE, GQA attention,
    dense SwiGLU or MoE FFN), final norm, LM head.

    Which layers are MoE (DeepSeek-V3 / Llama 4 / Qwen2-MoE patterns): the first
    ``first_dense_layers`` are dense; after them, layer i is MoE when
    ``(i - first_dense_layers) % moe_layer_freq == moe_layer_freq - 1`` — so freq 1 means
    every layer, freq 2 every other layer (the 2nd, 4th, ... as in Llama 4 Maverick).
    ``moe=None`` makes every layer dense (the baseline).

    ``dense_layers`` lists further layers forced dense whatever the rule above says
    (Qwen-MoE ``mlp_only_layers``).

    ``qk_norm``: RMSNorm on queries and keys, per head (``"head"``, Qwen3) or over all heads
    (``"full"``, OLMoE); ``"l2"`` (Llama 4): a weightless RMS normalisation per head after
    RoPE, on RoPE layers only; ``"head_after_rope"`` (Hunyuan): the per-head RMSNorm applied
    after RoPE instead of before. ``nope_layers``: layers without RoPE (Llama 4's NoPE layers). ``attn_bias``: biases on q/k/v projections (Qwen2).
    ``clip_qkv``: clamp q, k, v to [-c, c] after projection (and the "full" QK-norm), as
    OLMoE does for stability. ``o_bias``: a bias on the output projection (gpt-oss, MLA
    with attention_bias).

    ``attention="mla"``: DeepSeek-V2/V3 multi-head latent attention. Queries go through a
    rank-``q_lora_rank`` bottleneck (None: a direct projection), keys and values through a
    shared latent of rank ``kv_lora_rank`` plus one RoPE key of ``rotary_dim`` dims shared
    by all heads. ``head_dim`` is the query/key head width (no-RoPE part + ``rotary_dim``),
    ``v_head_dim`` the value head width. The cache holds decompressed per-head K and V.
    ``rotary_dim`` (gqa): RoPE on the first ``rotary_dim`` dims of each head only (GLM's
    partial rotary); None rotates the whole head. ``rope_interleave``: the rotated dims
    pair up as (x0, x1), (x2, x3), ... (DeepSeek) instead of (x_i, x_{i + d/2}).

    ``attn_sinks``: one learned logit per head that joins every softmax row and takes
    probability mass without contributing a value (gpt-oss; "attention sinks").
    ``sliding_layers``: the layers that use ``sliding_window`` (None: all of them), e.g.
    gpt-oss's alternating sliding / full attention.

    Granite's scalars (muP-style): ``embedding_multiplier`` scales the input embeddings,
    ``residual_multiplier`` each block's attention and FFN output before the residual add,
    ``attn_scale`` replaces the softmax scale 1/sqrt(head_dim), and the logits are divided by
    ``logits_scaling``.
    """

    vocab_size: int = 8192
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None -> n_heads (MHA)
    head_dim: int | None = None  # None -> d_model // n_heads
    d_ff: int = 1024  # hidden size of the dense SwiGLU FFN layers
    moe: MoEConfig | None = None
    moe_layer_freq: int = 1
    first_dense_layers: int = 0
    dense_layers: tuple[int, ...] = ()
    tie_embeddings: bool = False
    max_seq_len: int = 512
    sliding_window: int | None = None
    rope_theta: float = 10000.0
    rope_yarn: YarnRope | None = None
    rope_scaling: RopeScaling | None = None  # linear / llama3 (YaRN is rope_yarn)
    norm_eps: float = 1e-5
    norm: str = "rms"  # NORMS
    qk_norm: str | None = None
    attn_bias: bool = False
    clip_qkv: float | None = None
    o_bias: bool = False
    attention: str = "gqa"
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    v_head_dim: int | None = None
    rotary_dim: int | None = None
    rope_interleave: bool = False
    attn_sinks: bool = False
    sliding_layers: tuple[int, ...] | None = None
    nope_layers: tuple[int, ...] = ()
    attn_scale: float | None = None  # softmax scale; None = 1/sqrt(head_dim)
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0  # logits = lm_head(h) / logits_scaling
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len", "moe_layer_freq"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        for name in ("n_kv_heads", "head_dim", "sliding_window", "q_lora_rank", "kv_lora_rank", "v_head_dim",
                     "rotary_dim"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ConfigError(f"ModelConfig.{name} must be a positive integer or None, got {value!r}")
        if self.n_heads % self.kv_heads:
            raise ConfigError(
                f"ModelConfig.n_heads={self.n_heads} must be a multiple of n_kv_heads={self.kv_heads} "
                "(grouped-query attention shares each K/V head among n_heads/n_kv_heads query heads)"
            )
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ConfigError(
                f"ModelConfig.d_model={self.d_model} is not divisible by n_heads={self.n_heads}; set head_dim"
            )
        if self.attention not in ATTENTIONS:
            raise ConfigError(f"ModelConfig.attention={self.attention!r} is unknown; choose one of {ATTENTIONS}")
        if self.rotary_dim is not None and self.rotary_dim > self.dim_head:
            raise ConfigError(f"ModelConfig.rotary_dim={self.rotary_dim} exceeds head_dim={self.dim_head}")
        if self.rope_dim % 2:
            raise ConfigError(f"ModelConfig rotary dims ({self.rope_dim}: rotary_dim or head_dim) must be even for RoPE")
        if self.attention == "mla":
            if self.kv_lora_rank is None or self.rotary_dim is None or self.head_dim is None:
                raise ConfigError("ModelConfig attention='mla' needs kv_lora_rank, rotary_dim and head_dim")
            if self.rotary_dim >= self.head_dim:
                raise ConfigError(f"ModelConfig attention='mla': rotary_dim={self.rotary_dim} must be < "
                                  f"head_dim={self.head_dim} (the no-RoPE part is head_dim - rotary_dim)")
            if self.n_kv_heads not in (None, self.n_heads) or self.qk_norm or self.attn_sinks or self.clip_qkv:
                raise ConfigError("ModelConfig attention='mla' has one K/V head per query head and no "
                                  "qk_norm / attn_sinks / clip_qkv")
        elif self.q_lora_rank is not None or self.kv_lora_rank is not None:
            raise ConfigError("ModelConfig.q_lora_rank / kv_lora_rank need attention='mla'")
        for name in ("embedding_multiplier", "residual_multiplier", "logits_scaling", "attn_scale"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"ModelConfig.{name} must be a finite number > 0, got {value!r}")
        if isinstance(self.nope_layers, list):
            object.__setattr__(self, "nope_layers", tuple(self.nope_layers))
        if not isinstance(self.nope_layers, tuple) or not all(
            isinstance(i, int) and 0 <= i < self.n_layers for i in self.nope_layers
        ):
            raise ConfigError(f"ModelConfig.nope_layers must be layer indices in [0, n_layers={self.n_layers}), "
                              f"got {self.nope_layers!r}")
        if isinstance(self.sliding_layers, list):
            object.__setattr__(self, "sliding_layers", tuple(self.sliding_layers))
        if self.sliding_layers is not None and (
            not isinstance(self.sliding_layers, tuple)
            or not all(isinstance(i, int) and 0 <= i < self.n_layers for i in self.sliding_layers)
        ):
            raise ConfigError(f"ModelConfig.sliding_layers must be layer indices in [0, n_layers={self.n_layers}) "
                              f"or None, got {self.sliding_layers!r}")
        if not isinstance(self.first_dense_layers, int) or not 0 <= self.first_dense_layers <= self.n_layers:
            raise ConfigError(
                f"ModelConfig.first_dense_layers must be in [0, n_layers={self.n_layers}], got {self.first_dense_layers!r}"
            )
        if isinstance(self.dense_layers, list):  # from JSON; frozen configs hold tuples
            object.__setattr__(self, "dense_layers", tuple(self.dense_layers))
        if not isinstance(self.dense_layers, tuple) or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.n_layers for i in self.dense_layers
        ):
            raise ConfigError(
                f"ModelConfig.dense_layers must be layer indices in [0, n_layers={self.n_layers}), got {self.dense_layers!r}"
            )
        if self.clip_qkv is not None and not (
            isinstance(self.clip_qkv, int | float) and math.isfinite(self.clip_qkv) and self.clip_qkv > 0
        ):
            raise ConfigError(f"ModelConfig.clip_qkv must be a number > 0 or None, got {self.clip_qkv!r}")
        if self.norm not in NORMS:
            raise ConfigError(f"ModelConfig.norm={self.norm!r} is unknown; choose one of {NORMS}")
        if self.qk_norm not in QK_NORMS:
            raise ConfigError(f"ModelConfig.qk_norm={self.qk_norm!r} is unknown; choose one of {QK_NORMS}")
        if isinstance(self.rope_yarn, dict):  # from JSON
            object.__setattr__(self, "rope_yarn", YarnRope(**self.rope_yarn))
        if self.rope_yarn is not None and not isinstance(self.rope_yarn, YarnRope):
            raise ConfigError(f"ModelConfig.rope_yarn must be a YarnRope or None, got {type(self.rope_yarn).__name__}")
        if isinstance(self.rope_scaling, dict):  # from JSON
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ConfigError(f"ModelConfig.rope_scaling must be a RopeScaling or None, got "
                              f"{type(self.rope_scaling).__name__}")
        if self.rope_scaling is not None and self.rope_yarn is not None:
            raise ConfigError("ModelConfig: rope_scaling and rope_yarn are two RoPE scalings; give one")
        if not (math.isfinite(self.rope_theta) and self.rope_theta > 0):
            raise ConfigError(f"ModelConfig.rope_theta must be > 0, got {self.rope_theta!r}")
        if not (self.norm_eps > 0 and self.init_std > 0):
            raise ConfigError("ModelConfig.norm_eps and init_std must be > 0")
        if self.moe is not None:
            if not isinstance(self.moe, MoEConfig):
                raise ConfigError(f"ModelConfig.moe must be a MoEConfig or None, got {type(self.moe).__name__}")
            if self.moe.d_model != self.d_model:
                raise ConfigError(
                    f"ModelConfig.moe.d_model={self.moe.d_model} must equal ModelConfig.d_model={self.d_model}"
                )
            if not self.moe.causal:
                raise ConfigError("ModelConfig.moe.causal must be True: this is a causal decoder")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dim_head(self) -> int:
        """Query/key head width (MLA: no-RoPE part + RoPE part)."""
        return self.head_dim or self.d_model // self.n_heads

    @property
    def value_dim(self) -> int:
        """Value head width: ``v_head_dim`` (MLA), else the head width."""
        return self.v_head_dim or self.dim_head

    @property
    def rope_dim(self) -> int:
        """Dims of a query/key head that RoPE rotates (its cos/sin tables' width)."""
        return self.rotary_dim or self.dim_head

    def window_of(self, layer: int) -> int | None:
        """The sliding window of `layer` (None: full attention)."""
        if self.sliding_layers is not None and layer not in self.sliding_layers:
            return None
        return self.sliding_window

    @property
    def windows(self) -> list[int | None]:
        """The distinct windows over all layers (their masks are built once per forward)."""
        return sorted({self.window_of(i) for i in range(self.n_layers)}, key=lambda w: (w is not None, w or 0))

    def is_moe_layer(self, i: int) -> bool:
        if self.moe is None or i < self.first_dense_layers or i in self.dense_layers:
            return False
        return (i - self.first_dense_layers) % self.moe_layer_freq == self.moe_layer_freq - 1

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.is_moe_layer(i)]

    def with_(self, **changes) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["moe"] = self.moe.to_dict() if self.moe is not None else None
        d["rope_yarn"] = {f.name: getattr(self.rope_yarn, f.name) for f in fields(YarnRope)} if self.rope_yarn else None
        d["rope_scaling"] = ({f.name: getattr(self.rope_scaling, f.name) for f in fields(RopeScaling)}
                             if self.rope_scaling else None)
        d["dense_layers"] = list(self.dense_layers)
        if self.sliding_layers is not None:
            d["sliding_layers"] = list(self.sliding_layers)
        d["nope_layers"] = list(self.nope_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"ModelConfig: unknown field(s) {sorted(unknown)}; known fields are {sorted(known)}")
        d = dict(d)
        if d.get("moe") is not None:
            d["moe"] = MoEConfig.from_dict(d["moe"])
        return cls(**d)
