"""Serving many cameras from one server: Triton Inference Server (PyTriton) runs the lean runtime as
the model ``moleflow``; RemoteRuntime is its client with the Runtime's face. Needs ``[serve]``.

    moleflow-edge serve --export export/                       # one shell (or a container per GPU)
    moleflow-edge run --server localhost:8000 --source DIR     # on each line PC

Imports neither pytriton nor tritonclient until a server starts or a client connects.
"""

from moleflow_edge.serving.client import RemoteRuntime, ServerLost
from moleflow_edge.serving.libpython import ServingUnavailable, serving_problem
from moleflow_edge.serving.server import InferenceServer, ServeOptions, serve_export

__all__ = ["InferenceServer", "RemoteRuntime", "ServeOptions", "ServerLost", "ServingUnavailable", "serve_export", "serving_problem"]
