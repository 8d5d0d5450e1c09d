"""moelab: build, size, train, break, analyse and serve sparse Mixture-of-Experts transformers."""

from moelab.moe import MoE, MoEConfig, MoEOutput, RoutingStats

__version__ = "0.1.0"
__all__ = ["MoE", "MoEConfig", "MoEOutput", "RoutingStats", "__version__"]
