"""The MoE layer: config, routing maths, losses, dispatch, experts.

Names are imported from their submodule on first use (PEP 562), so importing the
torch-free `moelab.moe.config` does not pull in torch.
"""

import importlib

# name -> submodule that defines it
_EXPORTS = {
    "FeedForward": "moelab.moe.experts",
    "MoE": "moelab.moe.layer",
    "MoEConfig": "moelab.moe.config",
    "MoEOutput": "moelab.moe.layer",
    "NonFiniteRouterError": "moelab.moe.layer",
    "RoutedExperts": "moelab.moe.experts",
    "RoutingDecision": "moelab.moe.layer",
    "RoutingStats": "moelab.moe.layer",
    "active_ffn_hidden": "moelab.moe.config",
}

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


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
