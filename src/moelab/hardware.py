"""What this machine can do fast, decided from capabilities, never assumed.

The machines moelab runs on differ from one day to the next: one CPU had AMX-BF16 (a
2048^2 bf16 GEMM ran at 1515 GF/s against 318 for fp32), another AVX512-BF16 (363 vs
73 GF/s, measured 2026-12-01), and one had no native bf16 at all, where bf16 GEMMs were
emulated and ran about 400x *slower* than fp32. So bf16 on a CPU is used only where
the CPU has native bf16 arithmetic (`cpu_native_bf16`).

The rule, from the CPU flags (``/proc/cpuinfo``, else torch's own probes): native bf16
means ``amx_bf16`` or ``avx512_bf16``. ``MOELAB_CPU_BF16=1`` / ``=0`` overrides it (to
test both paths on one machine, or to correct a wrong guess).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of this machine (empty where /proc/cpuinfo is unreadable)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX-BF16 or AVX512-BF16).

    ``MOELAB_CPU_BF16`` ("1"/"0") overrides the detection.
    """
    override = os.environ.get("MOELAB_CPU_BF16")
    if override in ("0", "1"):
        return override == "1"
    return _detected_native_bf16()


@functools.cache
def _detected_native_bf16() -> bool:
    flags = cpu_flags()
    if flags:
        return any(f in flags for f in NATIVE_BF16_FLAGS)
    import torch  # no /proc/cpuinfo (not Linux): ask torch's own CPU probes

    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, p, lambda: False)()) for p in probes)
