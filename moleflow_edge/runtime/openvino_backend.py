"""OpenVINO backend for CPU line PCs: the same ONNX graphs, compiled by OpenVINO for the CPU.

Optional (pip install openvino). Inference precision is pinned to f32 for fp32 exports:
OpenVINO otherwise picks bf16 on CPUs that have it, and the scores would drift from the
calibrated thresholds. Routing is numpy, as for every CPU backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from moleflow_edge.contract import (
    EMBEDDING,
    IMAGE_SCORE,
    IMAGES,
    PATCH_SCORES,
    ROUTING_FEATURE,
    Manifest,
    TaskEntry,
)
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
    require,
)
from moleflow_edge.runtime.options import RuntimeOptions

if TYPE_CHECKING:  # openvino is imported where a backend is built
    from openvino import CompiledModel


class OpenVinoDetector(DetectorEngine):
    def __init__(self, task: str, compiled: CompiledModel, nbytes: int) -> None:
        self.task = task
        self.estimated_bytes = nbytes
        self._compiled = compiled
        self._request = compiled.create_infer_request()

    def run(self, features: FeatureBatch, rows: list[int]) -> tuple[np.ndarray, np.ndarray]:
        embedding = features.embedding if len(rows) == features.size else features.embedding[rows]  # type: ignore[index]
        out = self._request.infer({EMBEDDING: embedding})
        return np.array(out[PATCH_SCORES]), np.array(out[IMAGE_SCORE])

    def close(self) -> None:
        self._request = None
        self._compiled = None


class OpenVinoBackend(GraphBackend):
    kind = Backend.OPENVINO

    def __init__(self, root: Path, manifest: Manifest, options: RuntimeOptions) -> None:
        require("openvino", self.kind, "openvino")
        import openvino as ov

        super().__init__(root, manifest, options)
        device, threads, precision = "CPU", options.threads, self.precision
        self._core = ov.Core()
        if device not in self._core.available_devices:
            raise BackendError(f"OpenVINO has no device {device!r} here (available: {self._core.available_devices})")
        self._ov_device = device
        self.device = device.lower()
        self._config: dict[str, object] = {"PERFORMANCE_HINT": "LATENCY"}
        if device == "CPU":  # fp16/int8 graphs carry their own precision; never let the CPU drop to bf16
            self._config["INFERENCE_PRECISION_HINT"] = "f32"
        if threads:
            self._config["INFERENCE_NUM_THREADS"] = threads
        self._backbone = self._compile(read_verified(root, backbone_graph(manifest, precision)))
        self._request = self._backbone.create_infer_request()
        self._version = ov.get_version()

    def _compile(self, path: Path) -> CompiledModel:
        try:
            return self._core.compile_model(str(path), self._ov_device, self._config)
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses with its own messages
            raise BackendError(f"OpenVINO cannot compile {path}: {exc}") from exc

    def describe(self) -> str:
        return f"openvino {self._version} on {self._ov_device}"

    def backbone(self, images: np.ndarray) -> FeatureBatch:
        out = self._request.infer({IMAGES: images})
        return FeatureBatch(len(images), np.array(out[EMBEDDING]), routing=np.array(out[ROUTING_FEATURE]))

    def load_detector(self, entry: TaskEntry) -> DetectorEngine:
        artifact = graph_for(entry, self.precision)
        compiled = self._compile(read_verified(self.root, artifact))
        return OpenVinoDetector(entry.name, compiled, artifact_bytes(self.root, artifact))

    def close(self) -> None:
        self._request = None
        self._backbone = None
