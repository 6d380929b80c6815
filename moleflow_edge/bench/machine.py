"""The machine a benchmark runs on: CPU flags, a measured dense peak, and resident memory.

Reported beside every result, so that numbers from two machines (or two loads of one) are
never compared blind.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from moleflow_edge.runtime.engine_select import cpu_name


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def has_int8_dot_product() -> bool:
    """x86 VNNI (AVX512-VNNI or AVX-VNNI) or ARM dot-product: what onnxruntime's INT8 CPU kernels need."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "asimddp"})


def numpy_peak_gflops(size: int = 1024, repeats: int = 5) -> float:
    """Measured fp32 matmul GFLOP/s (best of ``repeats``): this machine's practical dense peak, now."""
    a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    b = a.T.copy()
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2.0 * size**3 / best / 1e9


def _timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def machine_info(threads: int | None) -> dict:
    import onnxruntime

    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": cpu_name(),
        "cpus": os.cpu_count(),
        "threads": threads,
        "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "int8_dot_product": has_int8_dot_product(),
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_providers": onnxruntime.get_available_providers(),
        "numpy_matmul_gflops": round(numpy_peak_gflops(), 1),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        info["torch"] = None
    return info


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark for this process (Linux clear_refs), so a peak is per backend."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """VmHWM (peak resident set since the last reset) or, without /proc, the process's lifetime peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")
