"""What differs between TensorRT 10 and 11, told apart by what the module has, not its version string.

TensorRT 11 made every network strongly typed and removed weak typing: BuilderFlag.FP16/INT8,
calibrators, and ICudaEngine.device_memory_size (use device_memory_size_v2); its trtexec has no
--fp16/--int8 and needs no --stronglyTyped. TensorRT 10 builds a graph at the precision it
carries (fp16 weights, QDQ) only when the network is created STRONGLY_TYPED, a flag TensorRT 11
keeps and ignores. Each function takes the module or object it reads, so tests pass fakes shaped
like either version. Also here: the keys engines and timing caches are filed under, shared by
the exporter (which builds) and the runtime (which looks up). Torch-free.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moleflow_edge.contract import Manifest, Precision
from moleflow_edge.errors import EngineError

MIN_MAJOR = 10  # the graphs are opset 18: TensorRT 10's parser is the first that reads them
DEFAULT_BATCH_PROFILE = (1, 1, 8)  # min, opt, max of the dynamic batch axis
_NUMPY_TYPES = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32,
                "INT64": np.int64, "BOOL": np.bool_, "UINT8": np.uint8}  # fmt: skip


class TensorRTVersionError(EngineError):
    """The installed TensorRT is older than the graphs need."""


def major_version(trt: Any) -> int:
    return int(str(trt.__version__).split(".")[0])


def require_supported(trt: Any) -> None:
    """Refuse TensorRT before 10, whose parser cannot read opset 18, with what to install."""
    if major_version(trt) < MIN_MAJOR:
        raise TensorRTVersionError(
            f"TensorRT {trt.__version__} is too old: the exported graphs are ONNX opset 18, which TensorRT "
            f"{MIN_MAJOR}'s parser is the first to read; install tensorrt>={MIN_MAJOR} (JetPack 6 or later on a Jetson)"
        )


def strongly_typed_flag(trt: Any) -> int | None:
    """The STRONGLY_TYPED network creation flag, None where the enum lacks it."""
    flags = getattr(trt, "NetworkDefinitionCreationFlag", None)
    return getattr(flags, "STRONGLY_TYPED", None)


def network_flags(trt: Any) -> int:
    """Flags for Builder.create_network: strongly typed wherever the enum has it (TensorRT 10
    needs it to honour the graphs' own types; TensorRT 11 is strongly typed anyway)."""
    flag = strongly_typed_flag(trt)
    return 0 if flag is None else 1 << int(flag)


def trtexec_typing_flag(major: int | None) -> str:
    """The trtexec option that builds a graph at its own precision: --stronglyTyped on TensorRT 10
    (None: the version on the target is unknown, JetPack 6 ships 10); nothing on 11, where it is on."""
    return "" if major is not None and major >= 11 else " --stronglyTyped"


def device_memory_bytes(engine: Any) -> int:
    """Scratch memory an engine needs: device_memory_size_v2 (TensorRT >= 10.1; the only one in 11),
    which may be 0, else device_memory_size (TensorRT 10.0)."""
    if hasattr(engine, "device_memory_size_v2"):
        return int(engine.device_memory_size_v2)
    return int(engine.device_memory_size)


def numpy_dtype(trt: Any, dtype: Any) -> np.dtype:
    """numpy type of a TensorRT tensor type, without trt.nptype (not part of the migration guarantees)."""
    for name, numpy_type in _NUMPY_TYPES.items():
        if getattr(trt.DataType, name, None) == dtype:
            return np.dtype(numpy_type)
    raise TypeError(f"TensorRT tensor type {dtype} has no numpy equivalent; the exported graphs use float and uint8")


def device_key(trt_version: str, capability: str) -> str:
    """ "trt<version>.sm<cc>": an engine runs only under the TensorRT version and GPU generation it was built by."""
    return f"trt{trt_version}.sm{capability}"


def timing_cache_file(trt_version: str, capability: str, cuda_version: str) -> str:
    """Relative path of the timing cache for one GPU generation, TensorRT and CUDA version: NVIDIA
    documents a cache as valid only for the device, CUDA and TensorRT version that wrote it."""
    return f"engines/timing/{device_key(trt_version, capability)}.cuda{cuda_version}.cache"


def batch_profile(manifest: Manifest, precision: Precision) -> tuple[int, int, int]:
    """The batch profile the export's engines of ``precision`` were built with (the backbone's
    first), else the default the exporter uses: onnxruntime's TensorRT provider gets the same."""
    for key, entry in sorted(manifest.engines.items()):
        if key.startswith(f"backbone.{precision.value}/"):
            low, opt, high = entry.batch_profile
            return low, opt, high
    return DEFAULT_BATCH_PROFILE
