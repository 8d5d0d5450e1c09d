"""Offloaded experts: run an MoE model whose routed experts are not all resident.

`ExpertStore` reads one expert at a time from a run's ``model.safetensors`` into a cache
of fixed slots under a byte budget (policies: `LRUPolicy`, `LFUPolicy`);
`OffloadedExperts` takes the place of ``moe.experts`` and asks the store for the experts
each batch routed to; `load_offloaded` builds the model without materialising the
expert weights. See docs/offload.md.

Names are imported from their submodule on first use (PEP 562).
"""

from moelab.lazy import lazy_exports

# name -> submodule that defines it
_EXPORTS = {
    "CachePolicy": "moelab.offload.policies",
    "LFUPolicy": "moelab.offload.policies",
    "LRUPolicy": "moelab.offload.policies",
    "POLICIES": "moelab.offload.policies",
    "ExpertLayout": "moelab.offload.store",
    "ExpertStore": "moelab.offload.store",
    "OffloadStats": "moelab.offload.store",
    "SCOPES": "moelab.offload.store",
    "OffloadedExperts": "moelab.offload.experts",
    "OffloadedModel": "moelab.offload.loader",
    "expert_layouts": "moelab.offload.loader",
    "load_offloaded": "moelab.offload.loader",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
