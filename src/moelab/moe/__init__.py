"""The MoE layer: config, routing maths, router, dispatcher, experts backends, losses."""

from moelab.moe.config import MoEConfig
from moelab.moe.dispatch import Dispatched, Dispatcher, LocalDispatcher
from moelab.moe.experts import (
    BACKENDS,
    ExpertsBackend,
    FeedForward,
    RoutedExperts,
    register_backend,
)
from moelab.moe.layer import (
    MoE,
    MoEOutput,
    RoutingDecision,
    RoutingStats,
    active_ffn_hidden,
)
from moelab.moe.router import Router, RouterOutput
from moelab.moe.routing import NonFiniteRouterError

__all__ = [
    "BACKENDS",
    "Dispatched",
    "Dispatcher",
    "ExpertsBackend",
    "FeedForward",
    "LocalDispatcher",
    "MoE",
    "MoEConfig",
    "MoEOutput",
    "NonFiniteRouterError",
    "RoutedExperts",
    "Router",
    "RouterOutput",
    "RoutingDecision",
    "RoutingStats",
    "active_ffn_hidden",
    "register_backend",
]
