"""Triton Python-backend (BLS) model ``moleflow``: frames in, the FrameResult fields out (serving/protocol.py),
like `moleflow-edge serve`, and through the same Runtime. Its backend's graphs are BLS calls to the
repository's models: ``moleflow_backbone`` (onnxruntime or TensorRT) once per batch of requests (Triton's
dynamic batcher merges them), each routed task's ``moleflow_task_<task>`` once for its frames, every
task of a batch sent at once (``async_exec``). Routing (the export's ``router.safetensors`` beside this
file), unknown frames and the candidate that explains them, thresholds and maps are the Runtime's own.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

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
from moleflow_edge.runtime.runtime import Runtime
from moleflow_edge.runtime.spec import RuntimeSpec
from moleflow_edge.serving.protocol import BACKBONE_MODEL, ENCODED, answer_requests, task_model
from moleflow_edge.targets import Backend

Asked = tuple[dict[str, np.ndarray], dict[str, object]]  # a request's inputs given, by name; its parameters


class TritonPythonModel:
    """What Triton's Python backend instantiates; ``initialize`` reads the manifest beside this file."""

    def initialize(self, args: dict[str, str]) -> None:
        folder = Path(args["model_repository"]) / args["model_version"]
        manifest = Manifest.from_dict(json.loads((folder / "manifest.json").read_text()))
        parameters = json.loads(args["model_config"])["parameters"]
        options = RuntimeOptions(Backend.TRITON_BLS, parameters["precision"]["string_value"])  # its thresholds apply
        backend, _ = create_backend(folder, manifest, options)
        # the table's triton-bls engine, imported from the package: not this copy's class, so no isinstance
        self.backend = cast(BlsBackend, backend)
        engines = EngineCache(lambda task: self.backend.load_detector(manifest.task(task)))
        self.runtime = Runtime(RuntimeSpec.of_export(folder, manifest), self.backend, engines, folder, manifest)
        self.map_side_cap = int(parameters["map_side_cap"]["string_value"])
        self.runtime.max_map_side = self.map_side_cap  # maps are made at the cap, shrunk per request

    async def execute(self, requests: list[Any]) -> list[Any]:
        """The Runtime works in a thread of this loop's executor, so that its task calls can be sent on
        this loop (``async_exec``) and run at once."""
        import triton_python_backend_utils as pb_utils

        self.backend.loop = asyncio.get_running_loop()
        asked = [self._read(request) for request in requests]
        answers = await self.backend.loop.run_in_executor(None, self._answer, asked)
        return [
            pb_utils.InferenceResponse(error=pb_utils.TritonError(str(a)))
            if isinstance(a, BackendError)
            else pb_utils.InferenceResponse(output_tensors=[_tensor(n, v) for n, v in a.items()])
            for a in answers
        ]

    def _answer(self, asked: list[Asked]) -> list[dict[str, np.ndarray] | BackendError]:
        """All of the batch's requests through one Runtime.infer, as `serve` does; when that fails (a
        backbone call failed), each request on its own, so that a failure is only its own request's."""
        try:
            return list(answer_requests(self.runtime, asked, self.map_side_cap))
        except BackendError:
            pass
        answers: list[dict[str, np.ndarray] | BackendError] = []
        for one in asked:
            try:
                answers.append(answer_requests(self.runtime, [one], self.map_side_cap)[0])
            except BackendError as exc:
                answers.append(exc)
        return answers

    @staticmethod
    def _read(request: Any) -> Asked:
        import triton_python_backend_utils as pb_utils

        tensors = {name: pb_utils.get_input_tensor_by_name(request, name) for name in (IMAGES, ENCODED)}
        return {name: t.as_numpy() for name, t in tensors.items() if t is not None}, json.loads(
            request.parameters() or "{}"
        )

    def finalize(self) -> None:
        """Triton unloads the model: the Runtime lets its engines go."""
        self.runtime.close()


def _tensor(name: str, values: np.ndarray) -> Any:
    import triton_python_backend_utils as pb_utils

    return pb_utils.Tensor(name, values.astype(np.object_) if values.dtype.kind == "S" else values)


class BlsBackend(GraphBackend):
    """The Runtime's backend inside Triton: each graph is a BLS request to the repository's model of it.
    ``loop``: the running ``execute``'s event loop, on which task calls are sent (None: sent one by one)."""

    kind = Backend.TRITON_BLS

    def __init__(self, root: Path, manifest: Manifest, options: RuntimeOptions) -> None:
        try:
            import triton_python_backend_utils  # noqa: F401 - there only inside Triton's Python backend
        except ImportError:
            raise BackendError("engine 'triton-bls' runs only in a Triton model repository's Python backend") from None
        super().__init__(root, manifest, options)
        self.loop: asyncio.AbstractEventLoop | None = None

    def backbone(self, images: np.ndarray) -> FeatureBatch:
        embedding, routing = bls_send(BACKBONE_MODEL, {IMAGES: images}, [EMBEDDING, ROUTING_FEATURE], None)()
        return FeatureBatch(len(images), embedding, routing)

    def load_detector(self, entry: TaskEntry) -> DetectorEngine:
        return BlsDetector(entry.name, self)

    def estimate_bytes(self, entry: TaskEntry) -> int:
        return 0  # the task's model lives in Triton, not in this process

    def describe(self) -> str:
        return f"Triton BLS calls, {self.precision.value}"


class BlsDetector(DetectorEngine):
    estimated_bytes = 0

    def __init__(self, task: str, backend: BlsBackend) -> None:
        self.task, self.backend = task, backend

    def run(self, features: FeatureBatch, rows: list[int]) -> tuple[np.ndarray, np.ndarray]:
        return self.start(features, rows)()

    def start(self, features: FeatureBatch, rows: list[int]) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
        embedding = np.asarray(features.embedding)[rows]
        collect = bls_send(
            task_model(self.task), {EMBEDDING: embedding}, [PATCH_SCORES, IMAGE_SCORE], self.backend.loop
        )

        def result() -> tuple[np.ndarray, np.ndarray]:
            patch, image = collect()
            return patch, image.reshape(len(rows))  # Triton gives image_score as (n, 1)

        return result


def bls_send(
    model: str, inputs: dict[str, np.ndarray], outputs: list[str], loop: asyncio.AbstractEventLoop | None
) -> Callable[[], list[np.ndarray]]:
    """Send a BLS request to another model of the repository: on ``loop`` by ``async_exec`` (it runs
    meanwhile), or, without one, when collected. What it returns collects the outputs; BackendError on
    failure (a task's failure is its frames' error in the Runtime, as a local engine's is)."""
    import triton_python_backend_utils as pb_utils

    request = pb_utils.InferenceRequest(
        model_name=model, inputs=[pb_utils.Tensor(n, a) for n, a in inputs.items()], requested_output_names=outputs
    )

    async def send() -> Any:
        return await request.async_exec()

    sent = None if loop is None else asyncio.run_coroutine_threadsafe(send(), loop)

    def collect() -> list[np.ndarray]:
        response = request.exec() if sent is None else sent.result()
        if response.has_error():
            raise BackendError(f"{model}: {response.error().message()}")
        return [pb_utils.get_output_tensor_by_name(response, n).as_numpy() for n in outputs]

    return collect
