"""TensorRT engines from the exported ONNX graphs (optional: needs tensorrt and cuda-python).

Built the same way on TensorRT 10 and 11 (runtime/trt_api.py tells them apart): a strongly typed
network, so every graph builds at the precision it carries (fp16 weights and casts, INT8 as
explicit QDQ) and no precision flag is ever set. Engines are plain plan files (no custom
header, so trtexec and DeepStream load them); what they were built from lives in the manifest,
and an engine is reused only when everything that shapes it is unchanged (``build_record``).
Timing caches are kept per GPU generation, TensorRT and CUDA version; one TensorRT rejects is
replaced by an empty one, with a warning. ``export_engines`` builds (or reuses) every engine an
export lists. UNVERIFIED: no TensorRT on the development machines.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moleflow_edge.atomic import write_atomic
from moleflow_edge.contract import ArtifactFile, EngineRecord, Precision, file_sha256, load_manifest, save_manifest
from moleflow_edge.errors import EngineError, UserError
from moleflow_edge.export.artifacts import ExportedFile, ExportReport, source_hash
from moleflow_edge.runtime import trt_api

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

WORKSPACE_BYTES = 1 << 30
TRTEXEC_TIMING_CACHE = "engines/timing/trtexec.cache"


class TensorRTUnavailable(UserError):
    """tensorrt or cuda-python is missing; the message carries the trtexec commands to run instead."""


class TimingCacheRejected(UserWarning):
    """TensorRT refused a saved timing cache (another TensorRT, CUDA or GPU wrote it)."""


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


@dataclass(frozen=True)
class BuildTarget:
    """Where engines are built: TensorRT version, GPU compute capability ("87"), CUDA runtime ("12.6")."""

    trt_version: str
    capability: str
    cuda_version: str

    @property
    def device(self) -> str:
        return trt_api.device_key(self.trt_version, self.capability)

    @property
    def timing_cache(self) -> str:
        return trt_api.timing_cache_file(self.trt_version, self.capability, self.cuda_version)


def build_target(trt: Any, device_id: int = 0) -> BuildTarget:
    """This machine's TensorRT version, the GPU's compute capability and the CUDA runtime version;
    makes ``device_id`` the current GPU, the one TensorRT builds on."""
    from moleflow_edge.runtime import cuda_memory as cm

    if not cm.cuda_available():
        raise TensorRTUnavailable("building TensorRT engines needs cuda-python: pip install 'cuda-python>=12'")
    if cm.device_count() == 0:
        raise EngineError("no CUDA device is visible; engines must be built on the GPU that runs them")
    cm.set_device(device_id)
    runtime = int(cm.check_cuda(cm.cudart.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion"))  # 12060 = 12.6
    cuda = f"{runtime // 1000}.{runtime % 1000 // 10}"
    return BuildTarget(str(trt.__version__), cm.compute_capability(device_id), cuda)


def build_record(
    graph_sha256: str, precision: Precision, batch: tuple[int, int, int], workspace_bytes: int, target: BuildTarget
) -> dict[str, object]:
    """Everything that changes an engine (EngineRecord.build); the manifest keeps it beside the engine's
    file and hash."""
    return {
        "graph_sha256": graph_sha256,
        "precision": precision,
        "batch_profile": list(batch),
        "workspace_bytes": workspace_bytes,
        "tensorrt_version": target.trt_version,
        "compute_capability": target.capability,
    }


def reusable(out: Path, entry: EngineRecord | None, record: dict[str, object]) -> bool:
    """True when ``entry`` (a manifest engine entry) was built from ``record`` and its file is intact."""
    if entry is None or entry.build() != record:
        return False
    path = out / entry.file
    return path.is_file() and file_sha256(path) == entry.sha256


def trtexec_command(
    job: EngineJob, timing_cache: Path, trt_major: int | None = None, workspace_bytes: int = WORKSPACE_BYTES
) -> str:
    """The trtexec line that builds the same engine (e.g. on a Jetson, where the Python API may be absent).

    No --fp16/--int8 (TensorRT 11's trtexec has neither): the graph carries its precision, and
    --stronglyTyped makes TensorRT 10 honour it (``trt_major`` None: the target's version is unknown).
    """

    def dims(batch: int) -> str:
        return f"{job.input_name}:" + "x".join(str(d) for d in job.shape(batch))

    return (
        f"trtexec --onnx={job.onnx_path} --saveEngine={job.engine_path} --timingCacheFile={timing_cache} "
        f"--memPoolSize=workspace:{workspace_bytes >> 20} "
        f"--minShapes={dims(job.batch[0])} --optShapes={dims(job.batch[1])} --maxShapes={dims(job.batch[2])}"
        + trt_api.trtexec_typing_flag(trt_major)
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
            "The ONNX graphs are exported; to build the engines with trtexec instead, run on the device "
            "(TensorRT 10; on TensorRT 11 drop --stronglyTyped, which is always on there):\n" + lines
        ) from exc
    return tensorrt


class EngineBuilder:
    """Builds plan files with one timing cache per build target, so later builds (new tasks) reuse timings."""

    def __init__(self, trt: Any, timing_cache: Path, workspace_bytes: int = WORKSPACE_BYTES) -> None:
        trt_api.require_supported(trt)
        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.builder = trt.Builder(self.logger)
        self.timing_cache_path = timing_cache
        self.workspace_bytes = workspace_bytes

    def build(self, job: EngineJob) -> None:
        """Parse ``job.onnx_path`` and write the serialized engine to ``job.engine_path``."""
        trt = self.trt
        network = self.builder.create_network(trt_api.network_flags(trt))
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(job.onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineError(f"TensorRT could not parse {job.onnx_path}: {errors}")
        config = self.builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_bytes)
        self._attach_timing_cache(config)
        profile = self.builder.create_optimization_profile()
        profile.set_shape(job.input_name, job.shape(job.batch[0]), job.shape(job.batch[1]), job.shape(job.batch[2]))
        config.add_optimization_profile(profile)
        plan = self.builder.build_serialized_network(network, config)
        if plan is None:
            raise EngineError(f"TensorRT failed to build an engine from {job.onnx_path} (see the log above)")
        write_atomic(job.engine_path, lambda tmp: tmp.write_bytes(bytes(plan)))
        cache = bytes(config.get_timing_cache().serialize())
        write_atomic(self.timing_cache_path, lambda tmp: tmp.write_bytes(cache))

    def _attach_timing_cache(self, config: Any) -> None:
        """Load the saved cache; if TensorRT rejects it (set_timing_cache returns False, or no cache
        comes back), warn and start an empty one, which the next write replaces it with."""
        path = self.timing_cache_path
        saved = path.read_bytes() if path.is_file() else b""
        if saved:
            try:
                cache = config.create_timing_cache(saved)
            except RuntimeError:
                cache = None
            if cache is not None and config.set_timing_cache(cache, False):
                return
            warnings.warn(
                f"TensorRT rejected the timing cache {path} (written by another TensorRT, CUDA or GPU, or damaged); "
                "building without it, and a new cache will replace it",
                TimingCacheRejected,
                stacklevel=3,
            )
        if not config.set_timing_cache(config.create_timing_cache(b""), False):
            raise EngineError("TensorRT refused an empty timing cache; cannot build engines with this TensorRT")


def export_engines(
    out: Path,
    wanted: list[str],
    precisions: tuple[Precision, ...],
    batch: tuple[int, int, int],
    report: ExportReport,
    device_id: int = 0,
    signing_key: Ed25519PrivateKey | None = None,
) -> None:
    """Build (or reuse) engines for the backbone, router and wanted tasks' graphs. An engine is
    reused only when its build record (graph sha256, precision, batch profile, workspace, TensorRT
    version, GPU) is unchanged; its file name carries a hash of that record, so a rebuilt engine
    never overwrites the one the manifest still lists. Input shapes come from the manifest, which the
    graph export just wrote from the model's config. Each save is signed with ``signing_key`` when
    given, so that a signed export is never left unsigned between two engines."""
    manifest = load_manifest(out)
    image = (manifest.image_size, manifest.image_size, 3)
    embedding = (manifest.embed_dim, manifest.grid, manifest.grid)
    planned: list[tuple[dict[str, EngineRecord], str, ArtifactFile, str, tuple[int, ...], Precision]] = []
    for precision in precisions:
        graph = manifest.backbone_graphs[precision]
        planned.append((manifest.engines, f"backbone.{precision.value}", graph, "images", image, precision))
        for task in wanted:
            entry = manifest.task(task)
            planned.append((entry.engines, precision.value, entry.graphs[precision], "embedding", embedding,
                            precision))  # fmt: skip
    assert manifest.router_graph is not None
    planned.append((manifest.engines, "router", manifest.router_graph, "routing_feature", (manifest.routing_dim,),
                    Precision.FP32))  # fmt: skip

    def job(graph: ArtifactFile, tag: str, name: str, shape: tuple[int, ...], precision: Precision) -> EngineJob:
        stem = Path(graph.file).with_suffix("").as_posix().replace("/", ".")
        return EngineJob(out / graph.file, out / "engines" / f"{stem}{tag}.engine", name, shape, precision, batch)

    trt = import_tensorrt([job(g, "", n, s, p) for _, _, g, n, s, p in planned], out / TRTEXEC_TIMING_CACHE)
    target = build_target(trt, device_id)
    builder = EngineBuilder(trt, out / target.timing_cache, WORKSPACE_BYTES)
    for engines, slot, graph, name, shape, precision in planned:
        record = build_record(graph.sha256, precision, batch, WORKSPACE_BYTES, target)
        spec = job(graph, f".{target.device}.{source_hash(record)[:12]}", name, shape, precision)
        slot_key = f"{slot}/{target.device}"
        existing = engines.get(slot_key)
        relative = spec.engine_path.relative_to(out).as_posix()
        if existing is not None and reusable(out, existing, record):
            report.files.append(ExportedFile(existing.file, (out / existing.file).stat().st_size, 0.0, True))
            continue
        started = time.perf_counter()
        builder.build(spec)
        engines[slot_key] = EngineRecord(relative, file_sha256(spec.engine_path), **record)  # type: ignore[arg-type]
        report.files.append(
            ExportedFile(relative, spec.engine_path.stat().st_size, time.perf_counter() - started, False)
        )
        save_manifest(out, manifest, signing_key)  # after each engine: an interrupted build keeps what it built
        if existing and existing.file != relative:  # built from another record: no longer listed
            (out / existing.file).unlink(missing_ok=True)
    report.manifest = manifest
