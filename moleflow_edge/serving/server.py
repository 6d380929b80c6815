"""`moleflow-edge serve`: a real Triton Inference Server (PyTriton's bundled tritonserver) whose model
``moleflow`` is the lean runtime, and ``moleflow_info`` says what it serves.

Triton does the serving: HTTP and gRPC endpoints, health and readiness, Prometheus metrics, and a
dynamic batcher that merges requests from many cameras; each merged batch reaches ``_infer`` as
a list of requests, and every frame of them goes through one Runtime.infer call. SIGTERM (or
Ctrl-C) stops tritonserver gracefully: it refuses new requests and answers those it accepted.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

from moleflow_edge.contract import ManifestError
from moleflow_edge.runtime.backend import BackendError
from moleflow_edge.runtime.camera_loop import EXIT_BACKEND_ERROR, EXIT_LOAD_ERROR
from moleflow_edge.runtime.live_export import LiveExport
from moleflow_edge.runtime.runtime import Runtime
from moleflow_edge.serving.libpython import ServingUnavailable, prepare_stub_environment, serving_problem
from moleflow_edge.serving.protocol import (
    ENCODED,
    IMAGES,
    INFO,
    INFO_MODEL,
    INFO_QUERY,
    MODEL,
    OUTPUTS,
    answer_requests,
    describe,
)

__all__ = ["InferenceServer", "ServeOptions", "serve_export"]

DRAIN_TIMEOUT_S = 30  # tritonserver's --exit-timeout-secs: how long a stop waits for accepted requests


@dataclass(frozen=True)
class ServeOptions:
    """Where and how the server listens and batches (Triton's own default ports)."""

    address: str = "0.0.0.0"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_batch: int = 8
    max_queue_delay_us: int = 2000
    map_side_cap: int = 1024  # longest side of an anomaly map any request may ask for

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_queue_delay_us < 0 or self.map_side_cap < 1:
            raise ValueError("--max-batch and --map-size must be >= 1 and --max-queue-delay-us >= 0")
        ports = (self.http_port, self.grpc_port, self.metrics_port)
        if len(set(ports)) != 3 or not all(0 < p < 65536 for p in ports):
            raise ValueError(f"--http-port, --grpc-port and --metrics-port must be three different ports, got {ports}")


class InferenceServer:
    """A loaded Runtime behind a Triton server, switching to a newly committed export between batches
    (LiveExport). ``start`` returns once Triton is ready; ``wait`` blocks until SIGTERM or SIGINT,
    ``stop`` drains and stops (also on leaving a with block)."""

    def __init__(self, live: LiveExport, options: ServeOptions) -> None:
        self.live = live
        self.options = options
        live.runtime.max_map_side = options.map_side_cap  # maps are made at the cap, shrunk per request
        self._triton: Any = None
        self._stop_requested = threading.Event()

    def start(self) -> None:
        prepare_stub_environment()
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
        from pytriton.triton import Triton, TritonConfig

        o = self.options
        config = TritonConfig(
            http_address=o.address, http_port=o.http_port, grpc_address=o.address, grpc_port=o.grpc_port,
            metrics_address=o.address, metrics_port=o.metrics_port, exit_timeout_secs=DRAIN_TIMEOUT_S,
        )  # fmt: skip
        logging.getLogger("pytriton").setLevel(logging.WARNING)
        self._triton = Triton(config=config)
        outputs = [Tensor(name=name, dtype=dtype, shape=shape) for name, (dtype, shape) in OUTPUTS.items()]
        self._triton.bind(
            model_name=MODEL,
            infer_func=self._infer,
            inputs=[
                Tensor(name=IMAGES, dtype=np.uint8, shape=(-1, -1, 3), optional=True),
                Tensor(name=ENCODED, dtype=np.bytes_, shape=(1,), optional=True),
            ],
            outputs=outputs,
            config=ModelConfig(
                max_batch_size=o.max_batch, batcher=DynamicBatcher(max_queue_delay_microseconds=o.max_queue_delay_us)
            ),
        )
        self._triton.bind(
            model_name=INFO_MODEL,
            infer_func=self._info,
            inputs=[Tensor(name=INFO_QUERY, dtype=np.bytes_, shape=(1,))],
            outputs=[Tensor(name=INFO, dtype=np.bytes_, shape=(1,))],
            config=ModelConfig(batching=False),
        )
        self._triton.run()

    def wait(self) -> bool:
        """Serve until SIGTERM or SIGINT, then stop gracefully: True; False when tritonserver died first."""

        def request_stop(signum: int, _: FrameType | None) -> None:
            self._stop_requested.set()

        previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            while not self._stop_requested.wait(0.5) and self._triton.is_alive():
                pass
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        self.stop()
        return self._stop_requested.is_set()

    def stop(self) -> None:
        if self._triton is not None:
            self._triton.stop()  # SIGINT to tritonserver: it answers the requests it accepted, then exits
            self._triton = None

    def __enter__(self) -> InferenceServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the models ------------------------------------------------------------------------------
    def _info(self, requests: list[Any]) -> list[dict[str, np.ndarray]]:
        with self.live.use() as runtime:  # also which export scored which frames (LiveExport.summary)
            info = describe(runtime, self.options.max_batch, self.options.map_side_cap) | self.live.summary()
        text = json.dumps(info).encode()
        return [{INFO: np.array([text], np.bytes_)} for _ in requests]

    def _infer(self, requests: list[Any]) -> list[dict[str, np.ndarray]]:
        """One dynamic batch: every request's frames through one Runtime.infer, split back per request;
        on the export current when it starts (a newly committed one is switched to first)."""
        with self.live.use() as runtime:
            answers = answer_requests(runtime, [(r.data, r.parameters) for r in requests], self.options.map_side_cap)
            first = self.live.scored
            self.live.record(range(first, first + sum(len(a["task"]) for a in answers)))
        return answers


def serve_export(
    export_dir: str | Path,
    options: ServeOptions,
    say: Callable[[str], None],
    *,
    backend: str = "auto",
    precision: str | None = None,
    trusted_keys: list[str | Path] | None = None,
) -> int:
    """`moleflow-edge serve`: check and load the export (signature with ``trusted_keys``, every
    task's graph), start Triton, serve until SIGTERM or SIGINT, switching to an export newly committed
    to the folder between batches (LiveExport). Returns the exit code: 0 after a clean
    stop, 1 when it could not start, 4 when tritonserver died. What goes wrong is one line through
    ``say``, never a traceback."""
    try:
        problem = serving_problem()
        if problem is not None:
            raise ServingUnavailable(problem)
        runtime = Runtime.load(
            export_dir, backend, precision, trusted_keys=trusted_keys, max_map_side=options.map_side_cap
        )
    except ServingUnavailable as exc:
        say(f"error: cannot serve here: {exc}")
        return EXIT_LOAD_ERROR
    except (ManifestError, BackendError, ValueError, OSError) as exc:
        say(f"error: cannot load the export {export_dir}: {exc}")
        return EXIT_LOAD_ERROR
    with LiveExport(runtime, say) as live:  # closes the runtime current at the end
        try:
            runtime.check_graphs()
        except BackendError as exc:
            say(f"error: {exc}")
            return EXIT_LOAD_ERROR
        server = InferenceServer(live, options)
        try:
            server.start()
        except Exception as exc:  # tritonserver failed to start or load the model: its log above says more
            server.stop()
            say(f"error: tritonserver did not start ({type(exc).__name__}: {exc}); its log above says why")
            return EXIT_LOAD_ERROR
        o = options
        say(
            f"serving {', '.join(runtime.tasks)} on {runtime.description}: model {MODEL} at http {o.address}:{o.http_port}, "
            f"grpc {o.address}:{o.grpc_port}, metrics {o.address}:{o.metrics_port} (max batch {o.max_batch}, "
            f"queue delay {o.max_queue_delay_us} us); SIGTERM or Ctrl-C stops it after the requests in flight"
        )
        if not server.wait():
            say("error: tritonserver stopped unexpectedly; its log above says why")
            return EXIT_BACKEND_ERROR
    say("stopped: every accepted request was answered")
    return 0
