"""The Mixtral-style decoder, its KV caches, its config and named presets.

Names are imported from their submodule on first use (PEP 562), so importing the
torch-free `moelab.model.config` or `moelab.model.presets` does not pull in torch.
"""

from moelab.lazy import lazy_exports

# name -> submodule that defines it
_EXPORTS = {
    "Cache": "moelab.model.cache",
    "KVCache": "moelab.model.cache",
    "ModelConfig": "moelab.model.config",
    "ModelOutput": "moelab.model.decoder",
    "PRESETS": "moelab.model.presets",
    "StaticKVCache": "moelab.model.cache",
    "Transformer": "moelab.model.decoder",
    "get_preset": "moelab.model.presets",
}

__all__ = [
    "Cache",
    "KVCache",
    "ModelConfig",
    "ModelOutput",
    "PRESETS",
    "StaticKVCache",
    "Transformer",
    "get_preset",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
