"""Weight memory, KV-cache memory and the number of GPUs needed to serve.

Units: bytes; "GB" means 10^9 bytes everywhere in moelab size (so an "80 GB"
GPU is --gpu-memory 80, and a figure of 93.4 GB is 93.4e9 bytes).
"""

from __future__ import annotations

import math

from moelab.accounting.params import ParamCount
from moelab.accounting.spec import ArchSpec, AttentionSpec, Spec
from moelab.errors import ConfigError

# int4 ignores quantisation scales and zero points (typically +3-6% for group
# size 32-128); fp8 ignores per-tensor or per-block scales (negligible).
BYTES_PER_PARAM: dict[str, float] = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int4": 0.5}
WEIGHT_DTYPES = ("fp32", "bf16", "fp8", "int4")

# Share of GPU memory usable for weights + KV cache; the rest goes to the CUDA
# context, activations, the allocator's fragmentation and communication buffers.
USABLE_FRACTION = 0.9


def bytes_per_param(dtype: str) -> float:
    try:
        return BYTES_PER_PARAM[dtype]
    except KeyError:
        raise ConfigError(
            f"dtype {dtype!r} is not known; expected one of {', '.join(BYTES_PER_PARAM)}"
        ) from None


def weight_bytes(counts: ParamCount, dtype: str) -> float:
    """All parameters resident: every expert must be in memory even though a
    token uses only K of them, so this uses the *total* count: N_total x bytes."""
    return counts.total * bytes_per_param(dtype)


def kv_elements_per_token(att: AttentionSpec) -> int:
    """Cached numbers per token for one layer.

    GQA/MHA: a key and a value per KV head, 2 G d_h. MLA: the compressed latent
    r_kv plus the shared RoPE key d_rope, as DeepSeek's own inference (and vLLM,
    SGLang) cache it; transformers' eager MLA caches the decompressed keys and
    values instead, H (d_nope + d_rope + d_v) per token.
    """
    if att.kind == "mla":
        return att.kv_lora_rank + att.qk_rope_head_dim
    return 2 * att.n_kv_heads * att.head_dim


def kv_cache_bytes(spec: Spec, *, context: int, batch: int, dtype: str) -> float:
    """batch x sum over layers of kv_elements_per_token x min(context, window) x bytes.

    A sliding-window or chunked layer never holds more than `window` tokens.
    """
    if isinstance(spec, ArchSpec):
        layers = [layer.attention for layer in spec.layers]
    else:
        layers = [spec.attention] * spec.n_layers if spec.attention else []
    per_seq = sum(
        kv_elements_per_token(att) * min(context, att.window or context) for att in layers
    )
    return batch * per_seq * bytes_per_param(dtype)


def min_gpus(total_bytes: float, gpu_memory_gb: float, usable: float = USABLE_FRACTION) -> int:
    """ceil(bytes / (usable x GPU memory)): the fewest GPUs whose usable memory
    holds the weights and KV cache (tensor/expert parallel, no offload)."""
    if gpu_memory_gb <= 0:
        raise ConfigError(f"gpu memory must be > 0 GB, got {gpu_memory_gb}")
    return max(1, math.ceil(total_bytes / (usable * gpu_memory_gb * 1e9)))
