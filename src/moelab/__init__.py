"""moelab: build, size, train, break, analyse and serve sparse Mixture-of-Experts transformers.

The names below are imported on first use (PEP 562): ``import moelab.accounting`` must
not pay for torch. Layer order (lower never imports higher; enforced by
tests/test_layering.py, the table is `moelab.layers.LAYERS`):

    errors, io, layers, lazy, hardware -> moe -> model -> rundir -> accounting -> data
        -> train, infer, quant, offload -> hf, dist -> lab, serve, playground -> cli

`accounting` is pure arithmetic: it imports only errors, io, itself and the torch-free
config modules (moe.config, model.config, model.presets, rundir.files).
"""

from moelab.lazy import lazy_exports

__version__ = "0.1.0"

# name -> submodule that defines it
_EXPORTS = {
    "MoE": "moelab.moe.layer",
    "MoEConfig": "moelab.moe.config",
    "MoEOutput": "moelab.moe.layer",
    "RoutingStats": "moelab.moe.layer",
}

__all__ = ["MoE", "MoEConfig", "MoEOutput", "RoutingStats", "__version__"]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
