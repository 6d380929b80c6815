"""TensorRT engines from the exported ONNX graphs (optional: needs tensorrt and cuda-python).

Written against the TensorRT 10 Python API and kept working on TensorRT 11, which removed
the FP16/INT8 builder flags and INT8 calibrators: INT8 comes from the explicit QDQ graph and
FP16 from the fp16 graph, and a precision flag is set only where the enum still has it.
Engines are plain plan files (no custom header, so trtexec and DeepStream load them); what
they were built from lives in the manifest. UNVERIFIED here: no TensorRT on the dev machines.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moleflow_edge.contract import Precision

WORKSPACE_BYTES = 1 << 30
TIMING_CACHE = "engines/timing.cache"


class TensorRTUnavailable(ImportError):
    """tensorrt or cuda-python is missing; the message carries the trtexec commands to run instead."""


@dataclass(frozen=True)
class EngineJob:
    """One engine to build: an ONNX graph, its input (per-sample shape), a precision, a batch profile."""

    onnx_path: Path
    engine_path: Path
    input_name: str
    sample_shape: tuple[int, ...]  # input shape without the batch axis
    precision: Precision
    batch: tuple[int, int, int]  # min, opt, max of the dynamic batch axis

    def shape(self, batch: int) -> tuple[int, ...]:
        return (batch, *self.sample_shape)


def trtexec_command(job: EngineJob, timing_cache: Path) -> str:
    """The trtexec line that builds the same engine (e.g. on a Jetson, where the Python API may be absent)."""

    def dims(batch: int) -> str:
        return f"{job.input_name}:" + "x".join(str(d) for d in job.shape(batch))

    flags = {Precision.FP32: "", Precision.FP16: " --fp16", Precision.INT8: " --int8"}[job.precision]
    return (
        f"trtexec --onnx={job.onnx_path} --saveEngine={job.engine_path} --timingCacheFile={timing_cache} "
        f"--minShapes={dims(job.batch[0])} --optShapes={dims(job.batch[1])} --maxShapes={dims(job.batch[2])}{flags}"
    )


def import_tensorrt(jobs: Sequence[EngineJob], timing_cache: Path) -> Any:
    """``tensorrt`` itself, or an error saying what to install and the trtexec lines that do the same."""
    try:
        import tensorrt
    except ImportError as exc:
        lines = "\n".join(trtexec_command(job, timing_cache) for job in jobs)
        raise TensorRTUnavailable(
            "building TensorRT engines needs the tensorrt Python package and cuda-python on the target GPU: "
            "pip install 'moleflow-edge[tensorrt]' (on a Jetson, tensorrt comes with JetPack 6: "
            "apt install python3-libnvinfer; pip install cuda-python). "
            "The ONNX graphs are exported; to build the engines with trtexec instead, run on the device:\n" + lines
        ) from exc
    return tensorrt


def compute_capability() -> str:
    """The GPU's compute capability as "87" (Orin), "89", ...: engines only run where they were built."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError as exc:
            raise TensorRTUnavailable(
                "reading the GPU's compute capability needs cuda-python: pip install cuda-python"
            ) from exc
    err, device = cudart.cudaGetDevice()
    if err != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"no CUDA device available ({err}); engines must be built on the GPU that runs them")
    err, props = cudart.cudaGetDeviceProperties(device)
    if err != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"cudaGetDeviceProperties failed: {err}")
    return f"{props.major}{props.minor}"


class EngineBuilder:
    """Builds plan files with one shared timing cache, so later builds (new tasks) reuse layer timings."""

    def __init__(self, trt: Any, timing_cache: Path, workspace_bytes: int = WORKSPACE_BYTES) -> None:
        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.builder = trt.Builder(self.logger)
        self.timing_cache_path = timing_cache
        self.workspace_bytes = workspace_bytes

    @property
    def version(self) -> str:
        return str(self.trt.__version__)

    def build(self, job: EngineJob) -> None:
        """Parse ``job.onnx_path`` and write the serialized engine to ``job.engine_path``."""
        trt = self.trt
        network = self.builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(job.onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT could not parse {job.onnx_path}: {errors}")
        config = self.builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_bytes)
        flag = {Precision.FP16: "FP16", Precision.INT8: "INT8"}.get(job.precision)
        if flag and hasattr(trt.BuilderFlag, flag):  # TensorRT 11 dropped them: the graph's types decide
            config.set_flag(getattr(trt.BuilderFlag, flag))
        cached = self.timing_cache_path.read_bytes() if self.timing_cache_path.is_file() else b""
        cache = config.create_timing_cache(cached)
        config.set_timing_cache(cache, False)
        profile = self.builder.create_optimization_profile()
        profile.set_shape(job.input_name, job.shape(job.batch[0]), job.shape(job.batch[1]), job.shape(job.batch[2]))
        config.add_optimization_profile(profile)
        plan = self.builder.build_serialized_network(network, config)
        if plan is None:
            raise RuntimeError(f"TensorRT failed to build an engine from {job.onnx_path} (see the log above)")
        job.engine_path.parent.mkdir(parents=True, exist_ok=True)
        job.engine_path.write_bytes(bytes(plan))
        self.timing_cache_path.parent.mkdir(parents=True, exist_ok=True)
        self.timing_cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
