"""Triton Python-backend (BLS) model ``moleflow``: frames in, the FrameResult fields out (serving/protocol.py),
like `moleflow-edge serve`, and through the same Runtime. Its backend's graphs are BLS calls to the
repository's models: ``moleflow_backbone`` (onnxruntime or TensorRT) once per request, each routed task's
``moleflow_task_<task>`` once for its frames. Routing (the export's ``router.safetensors`` beside this
file), unknown frames and the candidate that explains them, thresholds and maps are the Runtime's own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
from moleflow_edge.runtime.backend import BackendError, DetectorEngine, FeatureBatch, GraphBackend
from moleflow_edge.runtime.backend_factory import create_backend
from moleflow_edge.runtime.engine_cache import EngineCache
from moleflow_edge.runtime.options import RuntimeOptions
from moleflow_edge.runtime.router_file import load_router_table
from moleflow_edge.runtime.runtime import Runtime
from moleflow_edge.serving.protocol import BACKBONE_MODEL, ENCODED, answer_requests, task_model
from moleflow_edge.targets import Backend


class TritonPythonModel:
    """What Triton's Python backend instantiates; ``initialize`` reads the manifest beside this file."""

    def initialize(self, args: dict[str, str]) -> None:
        folder = Path(args["model_repository"]) / args["model_version"]
        manifest = Manifest.from_dict(json.loads((folder / "manifest.json").read_text()))
        parameters = json.loads(args["model_config"])["parameters"]
        options = RuntimeOptions(Backend.TRITON_BLS, parameters["precision"]["string_value"])  # its thresholds apply
        backend, _ = create_backend(folder, manifest, options)
        engines = EngineCache(lambda task: backend.load_detector(manifest.task(task)))
        self.runtime = Runtime(folder, manifest, backend, load_router_table(folder, manifest), engines)
        self.map_side_cap = int(parameters["map_side_cap"]["string_value"])
        self.runtime.max_map_side = self.map_side_cap  # maps are made at the cap, shrunk per request

    def execute(self, requests: list[Any]) -> list[Any]:
        import triton_python_backend_utils as pb_utils

        responses = []
        for request in requests:  # one Runtime.infer per request: a failed backbone call fails only its own
            inputs = {}
            for name in (IMAGES, ENCODED):
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                inputs[name] = None if tensor is None else tensor.as_numpy()
            parameters = json.loads(request.parameters() or "{}")
            try:
                arrays = answer_requests(self.runtime, [(inputs, parameters)], self.map_side_cap)[0]
            except BackendError as exc:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
                continue
            tensors = [
                pb_utils.Tensor(n, a.astype(np.object_) if a.dtype.kind == "S" else a) for n, a in arrays.items()
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses


class BlsBackend(GraphBackend):
    """The Runtime's backend inside Triton: each graph is a BLS request to the repository's model of it."""

    kind = Backend.TRITON_BLS

    def __init__(self, root: Path, manifest: Manifest, options: RuntimeOptions) -> None:
        try:
            import triton_python_backend_utils  # noqa: F401 - there only inside Triton's Python backend
        except ImportError:
            raise BackendError("engine 'triton-bls' runs only in a Triton model repository's Python backend") from None
        super().__init__(root, manifest, options)

    def backbone(self, images: np.ndarray) -> FeatureBatch:
        embedding, routing = bls_call(BACKBONE_MODEL, {IMAGES: images}, [EMBEDDING, ROUTING_FEATURE])
        return FeatureBatch(len(images), embedding, routing)

    def load_detector(self, entry: TaskEntry) -> DetectorEngine:
        return BlsDetector(entry.name)

    def estimate_bytes(self, entry: TaskEntry) -> int:
        return 0  # the task's model lives in Triton, not in this process

    def describe(self) -> str:
        return f"Triton BLS calls, {self.precision.value}"


class BlsDetector(DetectorEngine):
    estimated_bytes = 0

    def __init__(self, task: str) -> None:
        self.task = task

    def run(self, features: FeatureBatch, rows: list[int]) -> tuple[np.ndarray, np.ndarray]:
        embedding = np.asarray(features.embedding)[rows]
        patch, image = bls_call(task_model(self.task), {EMBEDDING: embedding}, [PATCH_SCORES, IMAGE_SCORE])
        return patch, image.reshape(len(rows))  # Triton gives image_score as (n, 1)


def bls_call(model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
    """A BLS request to another model of the repository -> its outputs; BackendError on failure (a task's
    failure is its frames' error in the Runtime, as a local engine's is)."""
    import triton_python_backend_utils as pb_utils

    request = pb_utils.InferenceRequest(
        model_name=model, inputs=[pb_utils.Tensor(n, a) for n, a in inputs.items()], requested_output_names=outputs
    )
    response = request.exec()
    if response.has_error():
        raise BackendError(f"{model}: {response.error().message()}")
    return [pb_utils.get_output_tensor_by_name(response, n).as_numpy() for n in outputs]
