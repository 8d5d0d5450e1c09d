"""The MoE layer: config, routing maths, router, dispatcher, experts backends, losses.

Names are imported from their submodule on first use (PEP 562), so importing the
torch-free `moelab.moe.config` does not pull in torch.
"""

from moelab.lazy import lazy_exports

# name -> submodule that defines it
_EXPORTS = {
    "BACKENDS": "moelab.moe.experts",
    "Dispatched": "moelab.moe.dispatch",
    "Dispatcher": "moelab.moe.dispatch",
    "ExpertsBackend": "moelab.moe.experts",
    "FeedForward": "moelab.moe.experts",
    "LocalDispatcher": "moelab.moe.dispatch",
    "MoE": "moelab.moe.layer",
    "MoEConfig": "moelab.moe.config",
    "MoEOutput": "moelab.moe.layer",
    "NonFiniteRouterError": "moelab.moe.routing",
    "RoutedExperts": "moelab.moe.experts",
    "Router": "moelab.moe.router",
    "RouterOutput": "moelab.moe.router",
    "RoutingDecision": "moelab.moe.layer",
    "RoutingStats": "moelab.moe.layer",
    "active_ffn_hidden": "moelab.moe.config",
    "register_backend": "moelab.moe.experts",
}

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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
