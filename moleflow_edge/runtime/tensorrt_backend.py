"""Native TensorRT 10 backend: serialised engines from the export, run with cuda-python.

Engines are deserialised once (deserialize_cuda_engine), each gets one execution context;
tensor addresses are bound with set_tensor_address and the engine runs with
execute_async_v3 on the backend's one stream. Device buffers are allocated once for the
engine's largest batch and reused. The embedding never leaves the device: a task's detector
engine reads the backbone's output buffer in place (or a gathered copy of its rows, made
device-to-device); only distances and scores are copied back, into pinned memory.

The TensorRT 10/11 differences (device memory size, tensor types) go through trt_api, which
the tests exercise with fake modules of either shape. UNVERIFIED: written against the TensorRT
10 and 11 Python APIs and cuda-python without a GPU to run it on (the development machine has
none). Optional: needs tensorrt and cuda-python.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from moleflow_edge.contract import (
    DISTANCES,
    EMBEDDING,
    IMAGE_SCORE,
    IMAGES,
    PATCH_SCORES,
    ROUTING_FEATURE,
    EngineRecord,
    Manifest,
    ManifestError,
    TaskEntry,
)
from moleflow_edge.runtime import trt_api
from moleflow_edge.runtime.backend import Backend, BackendError, DetectorEngine, FeatureBatch, GraphBackend, require
from moleflow_edge.runtime.options import RuntimeOptions

if TYPE_CHECKING:  # cuda_memory is imported where a backend is built
    from moleflow_edge.runtime.cuda_memory import DeviceBuffer


def engine_key(slot: str, trt_version: str, capability: str) -> str:
    """The manifest key of an engine, as the exporter writes it: "<slot>/trt<version>.sm<cc>".

    slot is "backbone.<precision>" or "router" in Manifest.engines, "<precision>" in TaskEntry.engines:
    an engine runs only under the TensorRT version and on the GPU generation it was built for.
    """
    return f"{slot}/{trt_api.device_key(trt_version, capability)}"


def find_engine(engines: dict[str, EngineRecord], slot: str, trt_version: str, capability: str) -> EngineRecord | None:
    return engines.get(engine_key(slot, trt_version, capability))


def read_engine(root: Path, entry: EngineRecord, what: str) -> bytes:
    """Engine bytes after checking the sha256 the manifest lists for them."""
    path = root / entry.file
    if not path.is_file():
        raise ManifestError(f"{path} ({what} engine) is listed in the manifest but missing")
    plan = path.read_bytes()
    if hashlib.sha256(plan).hexdigest() != entry.sha256:
        raise ManifestError(f"{path} ({what} engine) does not match the manifest's sha256: rebuild it with export")
    return plan


class TrtEngine:
    """One deserialised engine, its execution context and output buffers for its largest batch."""

    def __init__(self, runtime: Any, plan: bytes, stream: Any, name: str) -> None:
        import tensorrt as trt

        from moleflow_edge.runtime.cuda_memory import DeviceBuffer

        self.name = name
        self.stream = stream
        self.engine = runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise BackendError(
                f"TensorRT cannot deserialise the {name} engine: it was built by another TensorRT version "
                "or for another GPU; rebuild it on this device with export --format engine"
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: trt_api.numpy_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.tails = {n: tuple(int(d) for d in self.engine.get_tensor_shape(n))[1:] for n in names}
        first = self.inputs[0]
        leading = int(self.engine.get_tensor_shape(first)[0])
        self.max_batch = leading if leading > 0 else int(self.engine.get_tensor_profile_shape(first, 0)[2][0])
        self.buffers = {n: DeviceBuffer(self.max_batch * self.row_bytes(n)) for n in self.outputs}

    def row_bytes(self, name: str) -> int:
        return int(np.prod(self.tails[name], dtype=np.int64)) * self.dtypes[name].itemsize

    @property
    def device_bytes(self) -> int:
        return trt_api.device_memory_bytes(self.engine) + sum(b.nbytes for b in self.buffers.values())

    def execute(self, batch: int, inputs: dict[str, int]) -> None:
        """Queue one run on the stream: set input shapes and every tensor address, execute_async_v3."""
        if batch > self.max_batch:
            raise BackendError(f"batch {batch} exceeds the {self.name} engine's maximum {self.max_batch}")
        for name in self.inputs:
            if not self.context.set_input_shape(name, (batch, *self.tails[name])):
                raise BackendError(f"{self.name} engine refused input shape {(batch, *self.tails[name])} for {name!r}")
            self.context.set_tensor_address(name, inputs[name])
        for name in self.outputs:
            self.context.set_tensor_address(name, self.buffers[name].ptr)
        if not self.context.execute_async_v3(self.stream.ptr):
            raise BackendError(f"TensorRT failed to run the {self.name} engine")

    def close(self) -> None:
        for buffer in self.buffers.values():
            buffer.close()
        self.buffers.clear()
        self.context = None
        self.engine = None


class TrtDetector(DetectorEngine):
    def __init__(self, backend: TensorRtBackend, task: str, engine: TrtEngine) -> None:
        from moleflow_edge.runtime.cuda_memory import PinnedBuffer

        self.task = task
        self.engine = engine
        self.estimated_bytes = engine.device_bytes
        self._backend = backend
        grid = engine.tails[PATCH_SCORES]
        self._patch = PinnedBuffer((engine.max_batch, *grid), engine.dtypes[PATCH_SCORES])
        self._image = PinnedBuffer((engine.max_batch,), engine.dtypes[IMAGE_SCORE])

    def run(self, features: FeatureBatch, rows: list[int]) -> tuple[np.ndarray, np.ndarray]:
        patches, images = [], []
        step = self.engine.max_batch
        for start in range(0, len(rows), step):
            chunk = rows[start : start + step]
            n = len(chunk)
            self.engine.execute(n, {EMBEDDING: self._backend.embedding_rows(features, chunk)})
            stream = self._backend.stream
            self.engine.buffers[PATCH_SCORES].copy_to_host(
                self._patch.address, n * self.engine.row_bytes(PATCH_SCORES), stream
            )
            self.engine.buffers[IMAGE_SCORE].copy_to_host(
                self._image.address, n * self.engine.row_bytes(IMAGE_SCORE), stream
            )
            stream.synchronize()
            patches.append(self._patch.view(n).astype(np.float32))  # astype copies out of the reused pinned buffer
            images.append(self._image.view(n).astype(np.float32))
        return np.concatenate(patches), np.concatenate(images)

    def close(self) -> None:
        self.engine.close()
        self._patch.close()
        self._image.close()


class TensorRtBackend(GraphBackend):
    kind = Backend.TENSORRT

    def __init__(self, root: Path, manifest: Manifest, options: RuntimeOptions) -> None:
        super().__init__(root, manifest, options)
        precision, device_id = self.precision, options.device_id
        require("tensorrt", self.kind, "'tensorrt>=10'")
        from moleflow_edge.runtime import cuda_memory as cm

        if not cm.cuda_available():
            raise BackendError("backend 'tensorrt' needs cuda-python: pip install 'cuda-python>=12'")
        if cm.device_count() == 0:
            raise BackendError("backend 'tensorrt' needs a CUDA device; none is visible to this process")
        import tensorrt as trt

        try:
            trt_api.require_supported(trt)
        except trt_api.TensorRTVersionError as exc:
            raise BackendError(str(exc)) from exc
        cm.set_device(device_id)
        self.device = f"cuda:{device_id}"
        self._trt_version = trt.__version__
        self._capability = cm.compute_capability(device_id)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.stream = cm.CudaStream()

        backbone = self._find(manifest.engines, f"backbone.{precision.value}")
        if backbone is None:
            raise ManifestError(
                f"the export has no {precision.value} backbone engine for TensorRT {self._trt_version} on a "
                f"sm{self._capability} GPU: run export --format engine --precision {precision.value} on this device"
            )
        self._backbone = TrtEngine(self._runtime, read_engine(root, backbone, "backbone"), self.stream, "backbone")
        self.max_batch = self._backbone.max_batch
        size = manifest.image_size
        self._images = cm.PinnedBuffer((self.max_batch, size, size, 3), np.uint8)
        self._images_device = cm.DeviceBuffer(self._images.nbytes)
        self._row_bytes = self._backbone.row_bytes(EMBEDDING)
        self._gather = cm.DeviceBuffer(self.max_batch * self._row_bytes)  # rows of one task, gathered on device

        router = self._find(manifest.engines, "router")
        self._router: TrtEngine | None = None
        if router is not None:
            self._router = TrtEngine(self._runtime, read_engine(root, router, "router"), self.stream, "router")
            self._distances = cm.PinnedBuffer((self.max_batch, len(manifest.tasks)), np.float32)
            self.routes_on_device = True
        else:  # no router engine: the (B,C) feature comes back for numpy routing, a few hundred bytes a frame
            self._routing = cm.PinnedBuffer((self.max_batch, manifest.routing_dim), np.float32)

    def _find(self, engines: dict[str, EngineRecord], slot: str) -> EngineRecord | None:
        return find_engine(engines, slot, self._trt_version, self._capability)

    def describe(self) -> str:
        return f"tensorrt {self._trt_version} on {self.device} (sm{self._capability})"

    def backbone(self, images: np.ndarray) -> FeatureBatch:
        batch = len(images)
        np.copyto(self._images.view(batch), images)
        self._images_device.copy_from_host(self._images.address, images.nbytes, self.stream)
        self._backbone.execute(batch, {IMAGES: self._images_device.address})
        embedding = self._backbone.buffers[EMBEDDING]
        if self._router is not None:
            return FeatureBatch(batch, embedding, device_routing=self._backbone.buffers[ROUTING_FEATURE])
        nbytes = batch * self._backbone.row_bytes(ROUTING_FEATURE)
        self._backbone.buffers[ROUTING_FEATURE].copy_to_host(self._routing.address, nbytes, self.stream)
        self.stream.synchronize()
        return FeatureBatch(batch, embedding, routing=self._routing.view(batch).copy())

    def distances(self, features: FeatureBatch) -> np.ndarray:
        if self._router is None:
            raise BackendError("the export has no router engine; routing runs on the host")
        batch = features.size
        routing = cast("DeviceBuffer", features.device_routing)  # this backend's own backbone output
        self._router.execute(batch, {ROUTING_FEATURE: routing.address})
        nbytes = batch * self._router.row_bytes(DISTANCES)
        self._router.buffers[DISTANCES].copy_to_host(self._distances.address, nbytes, self.stream)
        self.stream.synchronize()
        return self._distances.view(batch).astype(np.float32)

    def embedding_rows(self, features: FeatureBatch, rows: list[int]) -> int:
        """Device address of the rows' embeddings, contiguous: in place when they already are."""
        source = cast("DeviceBuffer", features.embedding).address  # this backend's own backbone output
        if rows == list(range(rows[0], rows[0] + len(rows))):
            return source + rows[0] * self._row_bytes
        for i, row in enumerate(rows):
            self._gather.copy_from_device(
                source + row * self._row_bytes, self._row_bytes, self.stream, i * self._row_bytes
            )
        return self._gather.address

    def estimate_bytes(self, entry: TaskEntry) -> int:
        found = self._find(entry.engines, self.precision.value)
        path = None if found is None else self.root / found.file
        return path.stat().st_size if path is not None and path.is_file() else 0

    def load_detector(self, entry: TaskEntry) -> DetectorEngine:
        found = self._find(entry.engines, self.precision.value)
        if found is None:
            raise ManifestError(
                f"task {entry.name!r} has no {self.precision.value} engine for TensorRT {self._trt_version} on a "
                f"sm{self._capability} GPU: run export --task {entry.name} --format engine on this device"
            )
        engine = TrtEngine(
            self._runtime, read_engine(self.root, found, f"{entry.name} detector"), self.stream, entry.name
        )
        if engine.dtypes[EMBEDDING] != self._backbone.dtypes[EMBEDDING]:
            engine.close()
            raise BackendError(
                f"task {entry.name!r}'s engine reads {engine.dtypes[EMBEDDING]} embeddings, the backbone writes "
                f"{self._backbone.dtypes[EMBEDDING]}: rebuild both at the same precision"
            )
        return TrtDetector(self, entry.name, engine)

    def close(self) -> None:
        for engine in (self._backbone, self._router):
            if engine is not None:
                engine.close()
        self._gather.close()
        self._images_device.close()
        self._images.close()
        self.stream.close()
