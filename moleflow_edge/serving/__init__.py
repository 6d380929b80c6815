"""Serving many cameras from one server: Triton Inference Server (PyTriton) runs the lean runtime as
the model ``moleflow``; RemoteRuntime is its client with the Runtime's face. Needs ``[serve]``.

    moleflow-edge serve --export export/                       # one shell (or a container per GPU)
    moleflow-edge run --server localhost:8000 --source DIR     # on each line PC

    from moleflow_edge.serving import RemoteRuntime
    with RemoteRuntime("localhost:8000") as remote:            # or grpc://localhost:8001
        result = remote.infer_one(frame)                       # the FrameResult Runtime.infer_one gives

Names load on first use, so that the command line imports nothing heavy until a command runs.
"""

from importlib import import_module

__all__ = ["InferenceServer", "RemoteRuntime", "ServeOptions", "ServingUnavailable", "serve_export", "serving_problem"]
_HOMES = {
    "RemoteRuntime": "client",
    "InferenceServer": "server",
    "ServeOptions": "options",
    "serve_export": "server",
    "ServingUnavailable": "libpython",
    "serving_problem": "libpython",
}


def __getattr__(name: str) -> object:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"moleflow_edge.serving.{_HOMES[name]}"), name)
