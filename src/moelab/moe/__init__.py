"""The MoE layer: config, routing maths, losses, dispatch, experts."""

from moelab.moe.config import MoEConfig
from moelab.moe.experts import FeedForward, RoutedExperts
from moelab.moe.layer import (
    MoE,
    MoEOutput,
    NonFiniteRouterError,
    RoutingDecision,
    RoutingStats,
    active_ffn_hidden,
)

__all__ = [
    "FeedForward",
    "MoE",
    "MoEConfig",
    "MoEOutput",
    "NonFiniteRouterError",
    "RoutedExperts",
    "RoutingDecision",
    "RoutingStats",
    "active_ffn_hidden",
]
