"""Lean, torch-free inference on exported MoLE-Flow graphs: what a line PC or a Jetson installs.

Imports numpy, OpenCV, onnxruntime, safetensors and, only when asked for, OpenVINO or
TensorRT with cuda-python; never torch (tests check it).

    from moleflow_edge.runtime import Runtime, RuntimeOptions, UNKNOWN

    runtime = Runtime.load("export/", RuntimeOptions(backend="auto"))  # the options object: runtime/options.py
    for result in runtime.infer([frame_a, frame_b]):     # BGR uint8 HxWx3, any size
        if result.error:            print("bad frame:", result.error)
        elif result.task == UNKNOWN: print("not a product we know")
        else:                        print(result.task, result.image_score, result.is_anomaly)
"""

from moleflow_edge.contract import ManifestError, Precision
from moleflow_edge.preprocess import FrameError
from moleflow_edge.router import UNKNOWN
from moleflow_edge.runtime.backend import Backend, BackendError, available_backends
from moleflow_edge.runtime.camera_loop import RunOutcome, run_source
from moleflow_edge.runtime.engine_cache import EngineStats
from moleflow_edge.runtime.inference_runtime import InferenceRuntime, ServerLost
from moleflow_edge.runtime.options import RunOptions, RuntimeOptions
from moleflow_edge.runtime.overlay import render_overlay
from moleflow_edge.runtime.result import FrameResult, StageTimings
from moleflow_edge.runtime.runtime import Runtime

__all__ = [
    "UNKNOWN",
    "Backend",
    "BackendError",
    "EngineStats",
    "FrameError",
    "FrameResult",
    "InferenceRuntime",
    "ManifestError",
    "Precision",
    "RunOptions",
    "RunOutcome",
    "Runtime",
    "RuntimeOptions",
    "ServerLost",
    "StageTimings",
    "available_backends",
    "render_overlay",
    "run_source",
]
