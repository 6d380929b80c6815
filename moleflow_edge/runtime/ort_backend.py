"""onnxruntime backend: the best execution provider installed (TensorRT EP > CUDA EP > CPU).

On the CPU, graphs run with plain numpy inputs and the router is numpy. With a GPU
provider the backend binds buffers (IOBinding): the embedding and routing feature stay
in device OrtValues from the backbone to the router and detector graphs; only distances and
scores are copied back. The same binding path also runs on the CPU device, which is how
the tests exercise it without a GPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from moleflow_edge.contract import (
    DISTANCES,
    EMBEDDING,
    IMAGE_SCORE,
    IMAGES,
    PATCH_SCORES,
    ROUTING_FEATURE,
    Manifest,
    ManifestError,
    Precision,
    TaskEntry,
)
from moleflow_edge.runtime import trt_api
from moleflow_edge.runtime.backend import (
    Backend,
    BackendError,
    DetectorEngine,
    FeatureBatch,
    GraphBackend,
    artifact_bytes,
    backbone_graph,
    graph_for,
    read_verified,
)
from moleflow_edge.runtime.options import RuntimeOptions
from moleflow_edge.targets import resolve_backend

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(uint8)": np.uint8}


def session_options(threads: int | None) -> ort.SessionOptions:
    """Full graph optimisation, sequential execution, no spinning; ``threads`` intra-op threads (None = per core)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # warnings about unused initialisers etc. are noise on a line PC
    # No busy-waiting worker threads between runs: the pipeline hands over from the backbone session
    # to the router, a flow session and OpenCV, and a pool still spinning after its run steals the
    # cores they need. Measured on 2 cores: 2-2.5x lower latency per frame (benchmarks/README.md).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    return options


def choose_providers(
    requested: list[str] | None, precision: Precision, device_id: int, trt_cache_dir: Path | None
) -> list[str | tuple[str, dict]]:
    """Providers in preference order; only those this onnxruntime build has."""
    available = ort.get_available_providers()
    names = requested if requested is not None else [*GPU_PROVIDERS, "CPUExecutionProvider"]
    missing = [n for n in names if n not in available]
    if requested is not None and missing:
        raise BackendError(f"onnxruntime has no {missing} here (available: {available}); install onnxruntime-gpu")
    chosen: list[str | tuple[str, dict]] = []
    for name in names:
        if name not in available:
            continue
        if name == "TensorrtExecutionProvider":
            options: dict = {
                "device_id": device_id,
                "trt_fp16_enable": precision is Precision.FP16,
                "trt_int8_enable": precision is Precision.INT8,  # int8 graphs are QDQ: scales come with them
            }
            if trt_cache_dir is not None:  # engines built by the EP are kept, so a restart is fast
                trt_cache_dir.mkdir(parents=True, exist_ok=True)
                options |= {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(trt_cache_dir)}
            chosen.append((name, options))
        elif name == "CUDAExecutionProvider":
            chosen.append((name, {"device_id": device_id}))
        else:
            chosen.append(name)
    return chosen


def trt_profile_options(input_name: str, sample_shape: tuple[int, ...], batch: tuple[int, int, int]) -> dict:
    """TensorRT provider profile for one graph's input, min/opt/max over the batch axis: one engine
    serves every batch size the runtime's per-task grouping makes, instead of a rebuild per new size."""

    def shape(size: int) -> str:
        return f"{input_name}:" + "x".join(str(d) for d in (size, *sample_shape))

    low, opt, high = batch
    return {"trt_profile_min_shapes": shape(low), "trt_profile_opt_shapes": shape(opt),
            "trt_profile_max_shapes": shape(high)}  # fmt: skip


def with_trt_profile(providers: list[str | tuple[str, dict]], profile: dict) -> list[str | tuple[str, dict]]:
    """``providers`` with ``profile`` added to the TensorRT provider's options (others unchanged)."""
    return [
        (entry[0], {**entry[1], **profile}) if isinstance(entry, tuple) and entry[0] == GPU_PROVIDERS[0] else entry
        for entry in providers
    ]


def _contiguous_runs(rows: list[int]) -> list[tuple[int, int]]:
    """[0,1,2,5,6] -> [(0,3),(5,7)]: stretches of the batch one detector call can read in place."""
    runs: list[tuple[int, int]] = []
    for row in rows:
        if runs and runs[-1][1] == row:
            runs[-1] = (runs[-1][0], row + 1)
        else:
            runs.append((row, row + 1))
    return runs


class OrtDetector(DetectorEngine):
    """A task's detector session; reads the embedding from host arrays or from a bound device buffer."""

    def __init__(self, backend: OrtBackend, task: str, session: ort.InferenceSession, nbytes: int) -> None:
        self.task = task
        self.session = session
        self.estimated_bytes = nbytes
        self._backend = backend
        self._outputs = [PATCH_SCORES, IMAGE_SCORE]
        self._input_dtype = _ORT_TYPES.get(session.get_inputs()[0].type, np.float32)

    def run(self, features: FeatureBatch, rows: list[int]) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(features.embedding, np.ndarray):
            embedding = features.embedding if len(rows) == features.size else features.embedding[rows]
            embedding = embedding.astype(self._input_dtype, copy=False)
            patch, image = self.session.run(self._outputs, {EMBEDDING: embedding})
            return patch, image
        return self._run_bound(features.embedding, rows)

    def _run_bound(self, embedding: ort.OrtValue, rows: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Read stretches of the device embedding in place (pointer offsets): no gather copy."""
        shape = embedding.shape()
        dtype = _ORT_TYPES[embedding.data_type()]
        row_bytes = int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
        patches, images = [], []
        for start, stop in _contiguous_runs(rows):
            binding = self.session.io_binding()
            binding.bind_input(
                EMBEDDING,
                self._backend.bind_device,
                self._backend.device_id,
                dtype,
                [stop - start, *shape[1:]],
                embedding.data_ptr() + start * row_bytes,
            )
            binding.bind_output(PATCH_SCORES, "cpu")
            binding.bind_output(IMAGE_SCORE, "cpu")
            self.session.run_with_iobinding(binding)
            patch, image = binding.copy_outputs_to_cpu()
            patches.append(patch)
            images.append(image)
        if len(patches) == 1:
            return patches[0], images[0]
        return np.concatenate(patches), np.concatenate(images)

    def close(self) -> None:
        self.session = None  # onnxruntime frees the session with its last reference


class OrtBackend(GraphBackend):
    kind = Backend.ONNXRUNTIME
    manifest: Manifest  # always the export it was loaded for (GraphBackend.__init__)

    def __init__(self, root: Path, manifest: Manifest, options: RuntimeOptions) -> None:
        """``options.providers``, else those of the target ``options.backend`` names, else the best this
        build has; the TensorRT provider, when asked for, keeps its engines in EXPORT/engines/ort_trt_cache."""
        super().__init__(root, manifest, options)
        precision, device_id = self.precision, options.device_id
        providers = options.providers or resolve_backend(options.backend)[1]
        cache = root / "engines" / "ort_trt_cache" if "TensorrtExecutionProvider" in (providers or ()) else None
        self.device_id = device_id
        self._options = session_options(options.threads)
        self._providers = choose_providers(None if providers is None else list(providers), precision, device_id, cache)
        self._explicit = providers is not None
        self.fallback: str | None = None
        size, grid = manifest.image_size, manifest.grid
        self._samples = {IMAGES: (size, size, 3), EMBEDDING: (manifest.embed_dim, grid, grid),
                         ROUTING_FEATURE: (manifest.routing_dim,)}  # fmt: skip
        self._batch = trt_api.batch_profile(manifest, precision)
        self._backbone = self._session(read_verified(root, backbone_graph(manifest, precision)), IMAGES)
        active = self._backbone.get_providers()
        on_gpu = active[0] in GPU_PROVIDERS  # a GPU build on a machine without a GPU falls back to CPU
        self.device = f"cuda:{device_id}" if on_gpu else "cpu"
        self.provider = active[0]
        if self.provider == GPU_PROVIDERS[0]:  # keep batches inside the TensorRT profile
            self.max_batch = self._batch[2]
        self.bind_device = "cuda" if on_gpu else "cpu"
        self.bound = on_gpu if options.io_binding is None else options.io_binding
        self._buffers: dict[tuple[str, int], ort.OrtValue] = {}
        self._output_dtypes = {o.name: _ORT_TYPES.get(o.type, np.float32) for o in self._backbone.get_outputs()}
        missing = {EMBEDDING, ROUTING_FEATURE} - set(self._output_dtypes)
        if missing or self._backbone.get_inputs()[0].name != IMAGES:
            raise ManifestError(
                f"{backbone_graph(manifest, precision).file} does not have the runtime's interface "
                f"(input {IMAGES!r}, outputs {EMBEDDING!r}, {ROUTING_FEATURE!r}): re-export it"
            )
        self._check_shapes()
        self._router: ort.InferenceSession | None = None
        if self.bound and manifest.router_graph is not None:
            self._router = self._session(read_verified(root, manifest.router_graph), ROUTING_FEATURE)
            self.routes_on_device = True

    def _check_shapes(self) -> None:
        """Refuse at load a manifest whose image_size, grid or dimensions are valid but not this graph's:
        otherwise the first frame fails deep inside onnxruntime."""
        values = [*self._backbone.get_inputs(), *self._backbone.get_outputs()]
        graph = {v.name: tuple(v.shape[1:]) for v in values if v.name in self._samples}
        wrong = [f"{name} {list(shape)} where the manifest implies {list(self._samples[name])}"
                 for name, shape in graph.items()
                 if all(isinstance(d, int) for d in shape) and shape != self._samples[name]]  # fmt: skip
        if wrong:
            raise ManifestError(
                f"{backbone_graph(self.manifest, self.precision).file} does not match the manifest "
                f"(image_size {self.manifest.image_size}): {'; '.join(wrong)}; re-export it"
            )

    def _session(self, path: Path, input_name: str) -> ort.InferenceSession:
        profile = trt_profile_options(input_name, self._samples[input_name], self._batch)
        try:
            return ort.InferenceSession(str(path), self._options, providers=with_trt_profile(self._providers, profile))
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            if self._providers != ["CPUExecutionProvider"] and not self._explicit:
                # a GPU build on a machine whose GPU or driver is missing: carry on on the CPU
                self.fallback = f"GPU providers failed ({exc}); using the CPU"
                self._providers = ["CPUExecutionProvider"]
                return self._session(path, input_name)
            raise BackendError(f"onnxruntime cannot load {path}: {exc}") from exc

    def describe(self) -> str:
        binding = ", IOBinding" if self.bound else ""
        return f"onnxruntime {ort.__version__} ({self.provider}{binding}) on {self.device}"

    def _buffer(self, name: str, shape: tuple[int, ...]) -> ort.OrtValue:
        """Device buffers allocated once per batch size and reused."""
        key = (name, shape[0])
        value = self._buffers.get(key)
        if value is None:
            value = ort.OrtValue.ortvalue_from_shape_and_type(
                list(shape), self._output_dtypes[name], self.bind_device, self.device_id
            )
            self._buffers[key] = value
        return value

    def backbone(self, images: np.ndarray) -> FeatureBatch:
        batch = len(images)
        if not self.bound:
            embedding, routing = self._backbone.run([EMBEDDING, ROUTING_FEATURE], {IMAGES: images})
            return FeatureBatch(batch, embedding, routing=routing)
        m = self.manifest
        embedding = self._buffer(EMBEDDING, (batch, m.embed_dim, m.grid, m.grid))
        routing = self._buffer(ROUTING_FEATURE, (batch, m.routing_dim))
        binding = self._backbone.io_binding()
        binding.bind_cpu_input(IMAGES, images)
        binding.bind_ortvalue_output(EMBEDDING, embedding)
        binding.bind_ortvalue_output(ROUTING_FEATURE, routing)
        self._backbone.run_with_iobinding(binding)
        if self._router is None:  # no router graph: bring the small (B,C) feature back for numpy routing
            return FeatureBatch(batch, embedding, routing=routing.numpy())
        return FeatureBatch(batch, embedding, device_routing=routing)

    def distances(self, features: FeatureBatch) -> np.ndarray:
        if self._router is None or features.device_routing is None:
            raise BackendError("no router graph bound on the device")
        binding = self._router.io_binding()
        binding.bind_ortvalue_input(ROUTING_FEATURE, features.device_routing)
        binding.bind_output(DISTANCES, "cpu")
        self._router.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def load_detector(self, entry: TaskEntry) -> DetectorEngine:
        artifact = graph_for(entry, self.precision)
        session = self._session(read_verified(self.root, artifact), EMBEDDING)
        return OrtDetector(self, entry.name, session, artifact_bytes(self.root, artifact))

    def close(self) -> None:
        self._buffers.clear()
        self._router = None
        self._backbone = None
