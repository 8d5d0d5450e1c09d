"""Serving: a continuous-batching engine over a slot KV cache, and an OpenAI-compatible
HTTP server in front of it (`moelab serve`).

Names are imported from their submodule on first use (PEP 562).
"""

from moelab.lazy import lazy_exports

# name -> submodule that defines it
_EXPORTS = {
    "Engine": "moelab.serve.engine",
    "EngineClosedError": "moelab.serve.types",
    "EngineConfig": "moelab.serve.engine",
    "EngineStats": "moelab.serve.engine",
    "SlotKVCache": "moelab.serve.slots",
    "GenerationRequest": "moelab.serve.types",
    "QueueFullError": "moelab.serve.types",
    "StreamEvent": "moelab.serve.types",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
