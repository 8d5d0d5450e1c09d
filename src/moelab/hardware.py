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
import math
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


# ---------------------------------------------------------------------------- CPUs to use
#
# `os.cpu_count()` counts the machine's CPUs, not this process's: a taskset/cpuset
# affinity or a container's CPU quota (cgroup ``cpu.max`` / ``cpu.cfs_quota_us``) leaves
# fewer. More compute threads than CPUs is what makes a contended run crawl: OpenMP
# threads wait at every barrier for a peer that is descheduled (BENCHMARKS.md, "Training
# on a busy machine").

_CGROUP_ROOT = Path("/sys/fs/cgroup")


def _cgroup_paths() -> list[tuple[str, str]]:
    """(controllers, path) of this process's cgroups, from /proc/self/cgroup."""
    try:
        text = Path("/proc/self/cgroup").read_text(encoding="utf-8")
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            out.append((parts[1], parts[2]))
    return out


def _read_quota(files: list[Path]) -> float | None:
    for f in files:
        try:
            text = f.read_text(encoding="utf-8").split()
        except OSError:
            continue
        if f.name == "cpu.max" and len(text) == 2:  # cgroup v2: "<quota> <period>" or "max <period>"
            if text[0] != "max" and int(text[1]) > 0:
                return int(text[0]) / int(text[1])
            return None
        if f.name == "cpu.cfs_quota_us" and text:  # cgroup v1: -1 = no quota
            quota = int(text[0])
            try:
                period = int((f.parent / "cpu.cfs_period_us").read_text(encoding="utf-8").split()[0])
            except (OSError, ValueError, IndexError):
                return None
            return quota / period if quota > 0 and period > 0 else None
    return None


def cpu_quota() -> float | None:
    """The CPU quota of this process's cgroup in CPUs (e.g. 1.5), or None where none is set
    (or none can be read: not Linux, no cgroup file system)."""
    files: list[Path] = []
    for controllers, path in _cgroup_paths():
        rel = path.lstrip("/")
        if controllers == "":  # cgroup v2
            files += [_CGROUP_ROOT / rel / "cpu.max", _CGROUP_ROOT / "cpu.max"]
        elif "cpu" in controllers.split(","):
            for mount in (controllers, "cpu", "cpu,cpuacct"):
                files += [_CGROUP_ROOT / mount / rel / "cpu.cfs_quota_us", _CGROUP_ROOT / mount / "cpu.cfs_quota_us"]
    try:
        return _read_quota(list(dict.fromkeys(files)))
    except ValueError:
        return None


def available_cpus() -> int:
    """The CPUs this process may use: its affinity mask (``os.sched_getaffinity``), capped
    by the cgroup CPU quota (rounded up: a quota of 1.5 CPUs still runs 2 threads at once)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = cpu_quota()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def load_average() -> float | None:
    """The 1-minute load average (runnable processes, machine-wide), or None where unknown."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None

