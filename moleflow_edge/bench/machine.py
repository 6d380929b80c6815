"""The machine a benchmark runs on: CPU flags, a dense peak measured as the graphs run, and resident memory.

Reported beside every result, so that numbers from two machines (or two loads of one) are
never compared blind.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
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


PEAK_SIZE, PEAK_RUNS = 1024, 7  # a square fp32 MatMul big enough to be compute-bound; runs, the best kept


@dataclass(frozen=True)
class Peak:
    """A dense fp32 arithmetic rate and what it was measured with (printed beside every share of it)."""

    gflops: float
    measured_with: str


def onnxruntime_peak(threads: int | None, size: int = PEAK_SIZE, runs: int = PEAK_RUNS) -> Peak | None:
    """This machine's fp32 peak the way the graphs run: a ``size`` x ``size`` MatMul graph in an onnxruntime
    CPU session with the runtime's session options and ``threads`` (None: onnxruntime's default, one per
    core), best of ``runs`` after a warm-up. None without onnx (it builds the graph; the FLOP count needs it too)."""
    try:
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    import onnxruntime as ort

    from moleflow_edge.runtime.ort_backend import session_options

    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((size, size), dtype=np.float32) for _ in range(2))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], "peak",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [size, size])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [size, size])], [numpy_helper.from_array(b, "b")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    options, cpu = session_options(threads), ["CPUExecutionProvider"]
    session = ort.InferenceSession(model.SerializeToString(), options, providers=cpu)
    session.run(None, {"a": a})
    best = min(_timed(lambda: session.run(None, {"a": a})) for _ in range(runs))
    used = f"{threads} thread{'s' * (threads > 1)}" if threads else "onnxruntime's default threads (one per core)"
    how = f"best of {runs} runs of a {size}x{size} fp32 MatMul graph in onnxruntime CPU, {used}"
    return Peak(2.0 * size**3 / best / 1e9, f"{how}, the graphs' session options")


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
