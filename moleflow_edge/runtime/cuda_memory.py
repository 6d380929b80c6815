"""Owning wrappers for CUDA device memory, pinned host memory and a stream (cuda-python).

As in NVIDIA's TensorRT samples: every CUDA runtime call goes through ``check_cuda``, which
turns an error code into a CudaError; buffers are allocated once and freed by their owner.
cuda-python >= 12.6 exposes ``cuda.bindings.runtime``; older releases ``cuda.cudart``.

Run on an NVIDIA H100 by benchmarks/gpu_check.py (stream, pinned and device buffers, H2D/D2D/D2H
copies, an error code turned into CudaError, double close), matching numpy; the tests on CPU
machines cover it only through import guards.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from moleflow_edge.errors import EngineError

try:  # cuda-python >= 12.6
    from cuda.bindings import runtime as cudart
except ImportError:  # pragma: no cover - depends on the installed cuda-python
    try:
        from cuda import cudart  # cuda-python < 12.6
    except ImportError:
        cudart = None

__all__ = [
    "CudaError",
    "CudaStream",
    "DeviceBuffer",
    "PinnedBuffer",
    "check_cuda",
    "compute_capability",
    "cuda_available",
    "device_count",
    "set_device",
]


class CudaError(EngineError):
    """A CUDA runtime call failed; the message has CUDA's own error name and text."""


def _require_cudart() -> Any:
    if cudart is None:
        raise CudaError("CUDA needs the package cuda-python: pip install 'cuda-python>=12'")
    return cudart


def check_cuda(result: Any, what: str = "CUDA call") -> Any:
    """cuda-python calls return (error, *values): raise CudaError unless cudaSuccess, else the value(s)."""
    rt = _require_cudart()
    err, values = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    if err != rt.cudaError_t.cudaSuccess:
        _, name = rt.cudaGetErrorName(err)
        _, text = rt.cudaGetErrorString(err)
        decode = lambda s: s.decode() if isinstance(s, bytes) else str(s)  # noqa: E731
        raise CudaError(f"{what} failed: {decode(name)} ({decode(text)})")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def cuda_available() -> bool:
    return cudart is not None


def device_count() -> int:
    """CUDA devices visible to this process; 0 without cuda-python or a driver."""
    if cudart is None:
        return 0
    err, count = cudart.cudaGetDeviceCount()
    return int(count) if err == cudart.cudaError_t.cudaSuccess else 0


def compute_capability(device_id: int) -> str:
    """The GPU's compute capability as the exporter names engines by it: "87" (Orin), "89", "90"."""
    props = check_cuda(_require_cudart().cudaGetDeviceProperties(device_id), "cudaGetDeviceProperties")
    return f"{props.major}{props.minor}"


def set_device(device_id: int) -> None:
    check_cuda(_require_cudart().cudaSetDevice(device_id), f"cudaSetDevice({device_id})")


class _Owned:
    """A CUDA resource freed by ``close()`` and, failing that, when it is garbage-collected: a leak
    is worse than a late free. Errors during that last free (at interpreter exit) are ignored."""

    def close(self) -> None:
        raise NotImplementedError

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class CudaStream(_Owned):
    """One stream; every copy and engine run of a backend is queued on it, then synchronised once."""

    def __init__(self) -> None:
        self.handle = check_cuda(_require_cudart().cudaStreamCreate(), "cudaStreamCreate")

    @property
    def ptr(self) -> int:
        return int(self.handle)

    def synchronize(self) -> None:
        check_cuda(cudart.cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def close(self) -> None:
        if self.handle is not None:
            check_cuda(cudart.cudaStreamDestroy(self.handle), "cudaStreamDestroy")
            self.handle = None


class _Allocation(_Owned):
    """Memory at ``ptr``, None once freed."""

    ptr: int | None

    @property
    def address(self) -> int:
        """``ptr`` of memory not yet freed: a freed buffer is an error here, not a null address for CUDA."""
        if self.ptr is None:
            raise CudaError(f"{type(self).__name__} used after close()")
        return self.ptr


class DeviceBuffer(_Allocation):
    """``nbytes`` of device memory, freed with its owner."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = int(nbytes)
        self.ptr: int | None = int(
            check_cuda(_require_cudart().cudaMalloc(max(self.nbytes, 1)), f"cudaMalloc({nbytes})")
        )

    def copy_from_host(self, host_ptr: int, nbytes: int, stream: CudaStream) -> None:
        kind = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        check_cuda(cudart.cudaMemcpyAsync(self.ptr, host_ptr, nbytes, kind, stream.handle), "cudaMemcpyAsync H2D")

    def copy_to_host(self, host_ptr: int, nbytes: int, stream: CudaStream) -> None:
        kind = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        check_cuda(cudart.cudaMemcpyAsync(host_ptr, self.ptr, nbytes, kind, stream.handle), "cudaMemcpyAsync D2H")

    def copy_from_device(self, src_ptr: int, nbytes: int, stream: CudaStream, offset: int = 0) -> None:
        kind = cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        dst = self.address + offset
        check_cuda(cudart.cudaMemcpyAsync(dst, src_ptr, nbytes, kind, stream.handle), "cudaMemcpyAsync D2D")

    def close(self) -> None:
        if self.ptr is not None:
            check_cuda(cudart.cudaFree(self.ptr), "cudaFree")
            self.ptr = None


class PinnedBuffer(_Allocation):
    """Page-locked host memory (fast, asynchronous copies) seen as a numpy array."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype | type) -> None:
        self.dtype = np.dtype(dtype)
        self.shape = tuple(int(s) for s in shape)
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self.ptr: int | None = int(
            check_cuda(_require_cudart().cudaMallocHost(max(self.nbytes, 1)), f"cudaMallocHost({self.nbytes})")
        )
        raw = (ctypes.c_byte * max(self.nbytes, 1)).from_address(self.ptr)
        # memoryview: numpy's stubs take no ctypes array, numpy itself reads any buffer
        flat = np.frombuffer(memoryview(raw), dtype=np.uint8, count=self.nbytes)
        self.array: np.ndarray | None = flat.view(self.dtype).reshape(self.shape)

    def view(self, leading: int) -> np.ndarray:
        """The first ``leading`` rows (a batch smaller than the buffer)."""
        if self.array is None:
            raise CudaError("PinnedBuffer used after close()")
        return self.array[:leading]

    def close(self) -> None:
        if self.ptr is not None:
            self.array = None
            check_cuda(cudart.cudaFreeHost(self.ptr), "cudaFreeHost")
            self.ptr = None
