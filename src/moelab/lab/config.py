"""`LabConfig`: the scale of a lab experiment (model, run length, each experiment's knobs),
and its named presets `SCALES`."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

from moelab.errors import ConfigError
from moelab.model import ModelConfig
from moelab.moe import MoEConfig


@dataclass(frozen=True, kw_only=True)
class LabConfig:
    """Scale of a lab experiment: the small model and the short training run.

    The defaults are sized to show each effect in a minute or two per run on 2 CPU cores.
    """

    steps: int = 150
    batch_size: int = 16
    seq_len: int = 64
    lr: float = 3e-3
    seed: int = 0
    eval_every: int = 0  # 0: evaluate at step 0 and the end only
    eval_batches: int = 2  # validation batches per domain
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    num_experts: int = 8
    top_k: int = 2
    d_expert: int = 128
    # collapse
    skew_strength: float = 3.0  # router logit advantage of the favoured experts at init
    aux_loss_coef: float = 0.01  # the cure; also the setting of the instability/capacity runs
    bias_update_rate: float = 0.01  # aux-loss-free balancing, sized for a short run
    aux_sweep: tuple[float, ...] = (1e-3, 1e-1)  # more aux coefficients, besides 0 (broken) and aux_loss_coef
    cost_capacity_factor: float = 1.25  # the GShard/Switch training capacity the drops are measured at
    ep_sizes: tuple[int, ...] = (2, 4, 8)  # expert-parallel sizes the step-time factor is given for
    # instability
    unstable_lr: float = 3e-2
    unstable_router_std: float = 0.5
    z_loss_coef: float = 1e-2
    unstable_init_scale: float = 10.0  # probe-big-init: every weight's init variance x this (Switch §2.4)
    spike_factor: float = 1.5  # a loss > factor x running median of the last steps is a spike
    # capacity
    capacity_factors: tuple[float | None, ...] = (0.5, 1.0, 1.25, None)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_batches", "d_model", "n_layers", "n_heads",
                     "n_kv_heads", "num_experts", "top_k", "d_expert"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"LabConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.eval_every, int) or self.eval_every < 0:
            raise ConfigError(f"LabConfig.eval_every must be an integer >= 0, got {self.eval_every!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"LabConfig.seed must be an integer >= 0, got {self.seed!r}")
        for name in ("lr", "unstable_lr", "unstable_router_std", "unstable_init_scale", "spike_factor"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"LabConfig.{name} must be a finite number > 0, got {value!r}")
        for name in ("skew_strength", "aux_loss_coef", "bias_update_rate", "z_loss_coef"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"LabConfig.{name} must be a finite number >= 0, got {value!r}")
        if self.top_k > self.num_experts:
            raise ConfigError(f"LabConfig.top_k={self.top_k} exceeds num_experts={self.num_experts}")
        for c in self.aux_sweep:
            if not (isinstance(c, int | float) and math.isfinite(c) and c >= 0):
                raise ConfigError(f"LabConfig.aux_sweep must hold finite numbers >= 0, got {c!r}")
        if not (isinstance(self.cost_capacity_factor, int | float) and math.isfinite(self.cost_capacity_factor)
                and self.cost_capacity_factor > 0):
            raise ConfigError(f"LabConfig.cost_capacity_factor must be a finite number > 0, "
                              f"got {self.cost_capacity_factor!r}")
        for ep in self.ep_sizes:
            if not isinstance(ep, int) or isinstance(ep, bool) or ep <= 0 or self.num_experts % ep:
                raise ConfigError(f"LabConfig.ep_sizes must hold positive divisors of num_experts="
                                  f"{self.num_experts}, got {ep!r}")
        for cf in self.capacity_factors:
            if cf is not None and not (math.isfinite(cf) and cf > 0):
                raise ConfigError(f"LabConfig.capacity_factors must hold numbers > 0 or None, got {cf!r}")

    def with_(self, **changes: Any) -> LabConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def model_config(self, vocab_size: int, **moe_changes: Any) -> ModelConfig:
        moe = MoEConfig(
            d_model=self.d_model, d_expert=self.d_expert, num_experts=self.num_experts, top_k=self.top_k,
            aux_loss_coef=self.aux_loss_coef, z_loss_coef=0.0,
        )
        moe = replace(moe, **moe_changes)
        return ModelConfig(
            vocab_size=vocab_size, d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads, d_ff=self.top_k * self.d_expert, moe=moe,
            max_seq_len=max(self.seq_len, 64),
        )


# Scales: "default" for `moelab lab`, "quick" for the demo, "long" for the collapse horizon,
# "test" for the test suite.
SCALES: dict[str, LabConfig] = {
    "default": LabConfig(eval_every=15),
    "quick": LabConfig(steps=80, batch_size=12, seq_len=48, eval_every=10),
    # The horizon where a balanced MoE passes the collapsed one (docs/lab.md, collapse).
    "long": LabConfig(steps=1000, eval_every=50),
    "test": LabConfig(steps=25, batch_size=4, seq_len=32, d_model=32, n_heads=2, n_kv_heads=1,
                      d_expert=32, eval_batches=1),
}
