"""`MoEConfig`: every knob of one Mixture-of-Experts layer, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from moelab.errors import ConfigError

ROUTERS = ("softmax", "sigmoid", "switch", "expert_choice")
ACTIVATIONS = ("swiglu", "gelu", "swiglu_oai")
GATED_ACTIVATIONS = ("swiglu", "swiglu_oai")  # input projection [gate | up], 2F rows
DROP_POLICIES = ("probability", "position")
IMPLS = ("grouped", "loop")
ROUTER_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """One MoE layer.

    Routers (`router`):
      - ``"softmax"``: softmax over all E logits, keep the top-k (Mixtral, Qwen, OLMoE).
        ``norm_topk_prob=True`` renormalises the k kept weights to sum to 1 (Mixtral);
        ``False`` keeps the raw probabilities (Qwen2-MoE / OLMoE default). The weights are
        then multiplied by `routed_scaling_factor` (DeepSeek-V2; 1 elsewhere).
        ``selection_bias`` (ERNIE 4.5): a per-expert bias added to the probabilities when
        *choosing* the top-k only (the ``expert_bias`` buffer, as the sigmoid router's).
        ``n_group`` / ``topk_group`` (DeepSeek-V2 ``group_limited_greedy``): only the experts
        of the ``topk_group`` groups with the highest *maximum* probability are eligible.
      - ``"sigmoid"``: DeepSeek-V3. Per-expert sigmoid affinities; a selection-only bias
        (`expert_bias`, aux-loss-free balancing) shifts which experts are *chosen* but not
        the weights; optional group-limited routing (`n_group`, `topk_group`); weights are
        renormalised (``norm_topk_prob``) and scaled by `routed_scaling_factor`.
      - ``"switch"``: Switch Transformer top-1; the weight is the softmax probability of
        the chosen expert (not renormalised, so the router gets gradient).
      - ``"expert_choice"``: each expert picks its top-C tokens (Zhou et al. 2022). It
        looks at the whole batch, so a token's routing depends on later tokens: it is
        refused when ``causal=True``.

    Dispatch: ``capacity_factor=None`` is dropless (every routed token is computed).
    With a factor, each expert takes at most ``C = ceil(capacity_factor * T * K / E)``
    tokens; overflow is dropped by router probability (``drop_policy="probability"``) or
    by position (``"position"``: first choices before second choices, earlier tokens
    first, as in GShard/Switch). Dropped tokens get zero from the MoE branch.

    gpt-oss experts: ``router_bias`` adds a learned bias to the router logits,
    ``expert_proj_bias`` biases on every expert projection, and ``activation="swiglu_oai"``
    is its clamped GLU: ``(clamp(up, -l, l) + 1) * g * sigmoid(alpha g)`` with
    ``g = min(gate, l)``, ``alpha = swiglu_alpha``, ``l = swiglu_limit``. Both run on the
    readable per-expert reference (the fast kernels have no bias or clamp).
    ``weight_on_input`` (Llama 4): the routing weight scales the expert's *input*,
    ``expert_e(w x)``, not its output (different for a SwiGLU); also on the reference.

    ``impl="grouped"`` is the fast path (sorted tokens + grouped GEMM); ``"loop"`` is the
    readable per-expert reference. Both give the same result.
    """

    d_model: int
    d_expert: int
    num_experts: int
    top_k: int = 2
    activation: str = "swiglu"
    swiglu_alpha: float = 1.702  # activation="swiglu_oai" only
    swiglu_limit: float = 7.0  # activation="swiglu_oai" only
    expert_proj_bias: bool = False
    router_bias: bool = False
    weight_on_input: bool = False  # Llama 4: expert_e(w x) instead of w expert_e(x)
    selection_bias: bool = False  # softmax router: ERNIE 4.5's selection-only bias (the `expert_bias` buffer)

    num_shared_experts: int = 0
    d_shared_expert: int | None = None  # hidden size of ONE shared expert; None -> d_expert
    shared_expert_gate: bool = False  # Qwen2-MoE: shared output * sigmoid(x @ w_gate)

    router: str = "softmax"
    norm_topk_prob: bool = True
    n_group: int = 1  # sigmoid router: expert groups for group-limited routing
    topk_group: int = 1  # sigmoid router: groups kept per token
    routed_scaling_factor: float = 1.0
    # "float32": router logits in fp32 whatever the model's precision (Switch/ST-MoE
    # "selective precision"); "bfloat16": logits from a bf16 product, as a router without
    # that care would give under bf16 training (for the instability lab).
    router_dtype: str = "float32"
    noisy_gating: bool = False  # Shazeer 2017 noisy top-k (training only)
    jitter_eps: float = 0.0  # Switch multiplicative input jitter (training only)

    capacity_factor: float | None = None
    drop_policy: str = "probability"

    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    seq_aux_loss: bool = False  # DeepSeek-V3 sequence-wise balance loss (needs [B, T, D] input)
    bias_update_rate: float = 0.0  # gamma of DeepSeek-V3 aux-loss-free balancing; 0 = off

    causal: bool = True
    impl: str = "grouped"
    check_finite: bool = True  # raise on NaN/Inf router logits

    def __post_init__(self) -> None:
        for name in ("d_model", "d_expert", "num_experts", "top_k", "n_group", "topk_group"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"MoEConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.num_shared_experts, int) or self.num_shared_experts < 0:
            raise ConfigError(
                f"MoEConfig.num_shared_experts must be an integer >= 0, got {self.num_shared_experts!r}"
            )
        if self.d_shared_expert is not None and self.d_shared_expert <= 0:
            raise ConfigError(f"MoEConfig.d_shared_expert must be positive or None, got {self.d_shared_expert!r}")
        if self.shared_expert_gate and self.num_shared_experts == 0:
            raise ConfigError("MoEConfig.shared_expert_gate=True needs num_shared_experts >= 1")
        if self.top_k > self.num_experts:
            raise ConfigError(
                f"MoEConfig.top_k={self.top_k} exceeds num_experts={self.num_experts}: "
                "a token cannot be sent to more experts than exist"
            )
        if self.router not in ROUTERS:
            raise ConfigError(f"MoEConfig.router={self.router!r} is unknown; choose one of {ROUTERS}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"MoEConfig.activation={self.activation!r} is unknown; choose one of {ACTIVATIONS}")
        if self.drop_policy not in DROP_POLICIES:
            raise ConfigError(f"MoEConfig.drop_policy={self.drop_policy!r} is unknown; choose one of {DROP_POLICIES}")
        if self.impl not in IMPLS:
            raise ConfigError(f"MoEConfig.impl={self.impl!r} is unknown; choose one of {IMPLS}")
        if self.router_dtype not in ROUTER_DTYPES:
            raise ConfigError(f"MoEConfig.router_dtype={self.router_dtype!r} is unknown; choose one of {ROUTER_DTYPES}")
        if self.capacity_factor is not None and not (
            math.isfinite(self.capacity_factor) and self.capacity_factor > 0
        ):
            raise ConfigError(
                f"MoEConfig.capacity_factor must be > 0 (or None for dropless), got {self.capacity_factor!r}"
            )
        if self.router == "switch" and self.top_k != 1:
            raise ConfigError(f"MoEConfig.router='switch' is top-1 routing; top_k must be 1, got {self.top_k}")
        if self.router == "expert_choice" and self.causal:
            raise ConfigError(
                "MoEConfig.router='expert_choice' cannot be used in a causal model (causal=True): "
                "each expert picks its top tokens over the whole sequence, so whether a token is "
                "processed depends on future tokens, which leaks the future at training time and "
                "cannot be reproduced token by token at generation time. Use it with causal=False "
                "(encoders, non-autoregressive models) or pick a token-choice router."
            )
        if self.router == "expert_choice" and self.seq_aux_loss:
            raise ConfigError("MoEConfig.seq_aux_loss has no meaning for expert_choice routing (balanced by construction)")
        if self.n_group > 1 or self.topk_group > 1:
            if self.router not in ("sigmoid", "softmax"):
                raise ConfigError("MoEConfig.n_group/topk_group (group-limited routing) needs router='sigmoid' or 'softmax'")
            if self.num_experts % self.n_group:
                raise ConfigError(
                    f"MoEConfig.num_experts={self.num_experts} must be divisible by n_group={self.n_group}"
                )
            if self.topk_group > self.n_group:
                raise ConfigError(f"MoEConfig.topk_group={self.topk_group} exceeds n_group={self.n_group}")
            if self.top_k > self.topk_group * (self.num_experts // self.n_group):
                raise ConfigError(
                    f"MoEConfig.top_k={self.top_k} exceeds the experts in the kept groups "
                    f"(topk_group * num_experts / n_group = {self.topk_group * (self.num_experts // self.n_group)})"
                )
        for name in ("aux_loss_coef", "z_loss_coef", "jitter_eps", "bias_update_rate"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"MoEConfig.{name} must be a finite number >= 0, got {value!r}")
        if self.selection_bias and self.router != "softmax":
            raise ConfigError("MoEConfig.selection_bias is the softmax router's (the sigmoid router always has one)")
        if self.activation == "swiglu_oai" and self.num_shared_experts:
            raise ConfigError("MoEConfig.activation='swiglu_oai' (gpt-oss) has no shared-expert form; "
                              "set num_shared_experts=0")
        if self.activation == "swiglu_oai" and not (
            self.swiglu_alpha > 0 and self.swiglu_limit > 0 and math.isfinite(self.swiglu_limit)
        ):
            raise ConfigError(f"MoEConfig.swiglu_alpha / swiglu_limit must be > 0, got "
                              f"{self.swiglu_alpha!r} / {self.swiglu_limit!r}")
        if self.jitter_eps >= 1:
            raise ConfigError(f"MoEConfig.jitter_eps must be < 1, got {self.jitter_eps}")
        if not (math.isfinite(self.routed_scaling_factor) and self.routed_scaling_factor > 0):
            raise ConfigError(f"MoEConfig.routed_scaling_factor must be > 0, got {self.routed_scaling_factor!r}")
        if self.routed_scaling_factor != 1.0 and self.router not in ("softmax", "sigmoid"):
            raise ConfigError(
                f"MoEConfig.routed_scaling_factor={self.routed_scaling_factor} applies to the 'softmax' and "
                f"'sigmoid' routers only; router={self.router!r} would ignore it"
            )

    @property
    def shared_hidden(self) -> int:
        """Hidden width of the fused shared-expert FFN (all shared experts as one FFN)."""
        return self.num_shared_experts * (self.d_shared_expert or self.d_expert)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> MoEConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"MoEConfig: unknown field(s) {sorted(unknown)}; known fields are {sorted(known)}")
        return cls(**d)


def active_ffn_hidden(cfg: MoEConfig) -> int:
    """Hidden width a token actually runs through: K routed experts + the shared ones.

    A dense FFN of this width spends the same FLOPs per token as the MoE layer
    (router aside), which is what a fair dense baseline must match.
    """
    return cfg.top_k * cfg.d_expert + cfg.shared_hidden
