"""Triton Python-backend model ``moleflow`` in front of `serve`'s PyTriton model (``moleflow_core``).

PyTriton's backend stub cannot carry a tensor with a zero-length side to serve's process (its
shared-memory store fails on it with a traceback, for every request of the batch); Triton's model
config has no minimum size to refuse it with. This model answers such requests itself, one error per
frame (the one `run` gives), as it does a bad ``map_side`` (BLS cannot carry a float parameter), and
forwards every other request, parameters included (those BLS carries: bool, int, str), to
``moleflow_core`` by BLS: all of a batch's at once (``async_exec``), so that ``moleflow_core``'s dynamic
batcher merges them again into one Runtime.infer.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

from moleflow_edge.serving.protocol import MODEL, refusal


class TritonPythonModel:
    """What Triton's Python backend instantiates; the model to forward to is its config's ``forward_to``."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self.target = config["parameters"]["forward_to"]["string_value"]
        self.inputs = [tensor["name"] for tensor in config["input"]]
        self.outputs = [tensor["name"] for tensor in config["output"]]

    async def execute(self, requests: list[Any]) -> list[Any]:
        import triton_python_backend_utils as pb_utils

        answers: list[Any] = [None] * len(requests)
        forwarded: dict[int, Any] = {}
        for k, request in enumerate(requests):
            tensors = [t for n in self.inputs if (t := pb_utils.get_input_tensor_by_name(request, n)) is not None]
            parameters = json.loads(request.parameters() or "{}")
            refused = refusal({t.name(): tuple(t.shape()) for t in tensors}, parameters)
            if refused is not None:
                outputs = [
                    pb_utils.Tensor(n, a.astype(object) if a.dtype.kind == "S" else a) for n, a in refused.items()
                ]
                answers[k] = pb_utils.InferenceResponse(output_tensors=outputs)
                continue
            forwarded[k] = pb_utils.InferenceRequest(
                model_name=self.target,
                inputs=tensors,
                requested_output_names=self.outputs,
                parameters={n: v for n, v in parameters.items() if isinstance(v, (bool, int, str))},  # what BLS carries
            ).async_exec()
        for k, response in zip(forwarded, await asyncio.gather(*forwarded.values()), strict=True):
            answers[k] = (
                pb_utils.InferenceResponse(error=response.error())
                if response.has_error()
                else pb_utils.InferenceResponse(output_tensors=response.output_tensors())
            )
        return answers


def write_guard(store: Path, target: str, max_batch: int, queue_delay_us: int) -> Path:
    """Put the guard into a model repository ``store`` as ``moleflow`` (batching as given), forwarding to
    ``target``; returns its folder. Triton loads it with the repository's other models, before it is ready."""
    from moleflow_edge.serving.triton.configs import config_text, frame_tensors, model_config

    folder = store / MODEL
    (folder / "1").mkdir(parents=True)
    shutil.copyfile(__file__, folder / "1" / "model.py")
    forward = {"forward_to": {"string_value": target}}
    config = model_config(MODEL, max_batch, queue_delay_us, 1, backend="python", parameters=forward, **frame_tensors())
    (folder / "config.pbtxt").write_text(config_text(config))
    return folder
