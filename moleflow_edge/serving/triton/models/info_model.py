"""Triton Python-backend model ``moleflow_info``: what the repository serves, as the JSON that
`moleflow-edge serve`'s info model returns (RemoteRuntime reads tasks, calibration and limits from it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.info = (Path(args["model_repository"]) / args["model_version"] / "info.json").read_bytes()

    def execute(self, requests: list[Any]) -> list[Any]:
        import triton_python_backend_utils as pb_utils

        from moleflow_edge.serving.protocol import INFO

        reply = pb_utils.Tensor(INFO, np.array([self.info], np.object_))
        return [pb_utils.InferenceResponse(output_tensors=[reply]) for _ in requests]
