"""Shared benchmark helpers: timing, GEMM peak, machine description.

Timing convention: warm-up calls first (thread pools, allocator, MKL/oneDNN kernel
selection), then the median wall time of the timed repeats. Every number in one JSON
file is measured in one process, side by side, so ratios between rows are meaningful
even when absolute numbers drift with machine load.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch


def set_threads(num_threads: int | None = None) -> int:
    """Use ``num_threads`` (default: all cores this process may run on) for intra-op work."""
    if num_threads is None:
        num_threads = (
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count() or 1
        )
    torch.set_num_threads(num_threads)
    return num_threads


def time_ms(
    fn: Callable[[], object],
    *,
    warmup: int = 2,
    min_repeats: int = 3,
    max_repeats: int = 20,
    budget_s: float = 2.0,
    slow_s: float = 8.0,
) -> dict:
    """Median wall time of ``fn()`` in milliseconds, after ``warmup`` untimed calls.

    Repeats until ``max_repeats`` calls or ``budget_s`` seconds of timed calls, but at
    least ``min_repeats``. Very slow candidates (a first call over ``slow_s``, e.g. a
    baseline whose backward is quadratic in E) are not repeated: their first call is the
    one sample (one-time costs are noise at that scale), flagged ``first_call_only``.
    Returns ``{"median_ms", "min_ms", "repeats"}``.
    """
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    if first > slow_s:
        return {
            "median_ms": first * 1e3,
            "min_ms": first * 1e3,
            "repeats": 1,
            "first_call_only": True,
        }
    if first > budget_s:
        warmup, min_repeats = 0, 1
    for _ in range(warmup - 1):
        fn()
    times: list[float] = []
    spent = 0.0
    while len(times) < max_repeats and (len(times) < min_repeats or spent < budget_s):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
    return {
        "median_ms": statistics.median(times) * 1e3,
        "min_ms": min(times) * 1e3,
        "repeats": len(times),
    }


def gemm_peak_gflops(sizes: tuple[int, ...] = (1024, 2048, 4096), *, budget_s: float = 3.0) -> dict:
    """Square fp32 GEMM throughput at a few sizes; the peak is the best median.

    On this kind of VM the largest square GEMM is not the fastest (4096^3 runs at ~60%
    of 1024^3, presumably cache/memory limits of the host), so we take the best size as
    the peak rather than trusting one size.
    """
    per_size = {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        c = torch.empty(n, n)
        t = time_ms(
            lambda a=a, b=b, c=c: torch.mm(a, b, out=c), warmup=1, min_repeats=3, budget_s=budget_s
        )
        per_size[str(n)] = {"median_ms": t["median_ms"], "gflops": 2 * n**3 / t["median_ms"] / 1e6}
    peak = max(v["gflops"] for v in per_size.values())
    return {"peak_gflops": peak, "per_size": per_size}


def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        # Other jobs on a 2-core machine distort OpenMP GEMMs badly; record how busy it was.
        "loadavg_1m_5m_15m": list(os.getloadavg()),
    }
