"""Triton Python-backend (BLS) model ``moleflow``: frames in, the FrameResult fields out (serving/protocol.py),
like `moleflow-edge serve`. It decodes and resizes the frames, calls ``moleflow_backbone`` (onnxruntime or
TensorRT) once per request, routes with the export's router (``router.safetensors`` beside this file), calls
each routed task's ``moleflow_task_<task>`` model once for its frames, and thresholds and maps the scores.
Frames beyond every task's distance limit are unknown, without the explaining map the runtime draws.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


class TritonPythonModel:
    """What Triton's Python backend instantiates; ``initialize`` reads the manifest beside this file."""

    def initialize(self, args: dict[str, str]) -> None:
        from moleflow_edge.contract import Manifest
        from moleflow_edge.runtime.router_file import load_router_table

        folder = Path(args["model_repository"]) / args["model_version"]
        self.manifest = Manifest.from_dict(json.loads((folder / "manifest.json").read_text()))
        self.router = load_router_table(folder, self.manifest)
        self.config = json.loads(args["model_config"])
        self.map_side_cap = int(self.config["parameters"]["map_side_cap"]["string_value"])
        self.precision = self.config["parameters"]["precision"]["string_value"]  # its thresholds are this one's

    def execute(self, requests: list[Any]) -> list[Any]:
        import triton_python_backend_utils as pb_utils

        from moleflow_edge.serving.protocol import ENCODED, IMAGES, encode_results, map_side, request_frames

        responses = []
        for request in requests:
            inputs = {}
            for name in (IMAGES, ENCODED):
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                inputs[name] = None if tensor is None else tensor.as_numpy()
            try:
                side = min(map_side(json.loads(request.parameters() or "{}")), self.map_side_cap)
                results = self._results(*request_frames(inputs), side)
            except RuntimeError as exc:  # a failed BLS call: this request's error, the others go on
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
                continue
            arrays = encode_results(results, self.manifest.task_names)
            tensors = [
                pb_utils.Tensor(n, a.astype(np.object_) if a.dtype.kind == "S" else a) for n, a in arrays.items()
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses

    def _results(self, items: list[Any], decode_ms: list[float], side: int) -> list[Any]:
        from moleflow_edge.anomaly_map import anomaly_map, capped_shape
        from moleflow_edge.contract import EMBEDDING, IMAGE_SCORE, IMAGES, PATCH_SCORES, ROUTING_FEATURE
        from moleflow_edge.preprocess import FrameError, resize_frame
        from moleflow_edge.router import UNKNOWN
        from moleflow_edge.runtime.result import FrameResult
        from moleflow_edge.serving.protocol import complete_results

        m = self.manifest
        frames, computed = [], []  # frames: the resized good ones; computed: a result per decoded item
        for item in items:
            if isinstance(item, FrameResult):
                continue
            try:
                frames.append(resize_frame(item, m.image_size))
                computed.append(FrameResult(index=len(computed), frame_shape=tuple(item.shape)))
            except FrameError as exc:
                computed.append(FrameResult(index=len(computed), error=str(exc)))
        good = [k for k, r in enumerate(computed) if r.error is None]
        if good:
            embedding, routing = _call("moleflow_backbone", {IMAGES: np.stack(frames)}, [EMBEDDING, ROUTING_FEATURE])
            distances = self.router.distances(routing)
            routed = self.router.route(distances)
            groups: dict[str, list[int]] = {}
            for j, k in enumerate(good):
                computed[k].task = routed[j]
                computed[k].distances = dict(zip(self.router.tasks, distances[j].tolist()))
                if routed[j] != UNKNOWN:
                    groups.setdefault(routed[j], []).append(j)
            for task, rows in groups.items():
                patch, image = _call(f"moleflow_task_{task}", {EMBEDDING: embedding[rows]}, [PATCH_SCORES, IMAGE_SCORE])
                threshold = m.task(task).thresholds.get(self.precision)
                for j, p, s in zip(rows, patch, image):
                    result = computed[good[j]]
                    result.patch_scores, result.image_score = p, float(s)
                    result.decide(threshold)
                    if side > 0:
                        out_hw = capped_shape(result.frame_shape[:2], side)
                        result.anomaly_map = anomaly_map(p, m.image_size, m.map_sigma, out_hw=out_hw)
        return complete_results(items, iter(computed), decode_ms, side)


def _call(model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
    """A BLS request to another model of the repository -> its outputs; RuntimeError on failure."""
    import triton_python_backend_utils as pb_utils

    request = pb_utils.InferenceRequest(
        model_name=model, inputs=[pb_utils.Tensor(n, a) for n, a in inputs.items()], requested_output_names=outputs
    )
    response = request.exec()
    if response.has_error():
        raise RuntimeError(f"{model}: {response.error().message()}")
    return [pb_utils.get_output_tensor_by_name(response, n).as_numpy() for n in outputs]
