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
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import cv2
import numpy as np

from moleflow_edge.anomaly_map import capped_shape
from moleflow_edge.contract import ManifestError
from moleflow_edge.preprocess import FrameError
from moleflow_edge.runtime.backend import BackendError
from moleflow_edge.runtime.camera_loop import EXIT_LOAD_ERROR
from moleflow_edge.runtime.result import FrameResult
from moleflow_edge.runtime.runtime import Runtime
from moleflow_edge.serving.libpython import ServingUnavailable, prepare_stub_environment, serving_problem
from moleflow_edge.serving.protocol import (
    ENCODED,
    IMAGES,
    INFO,
    INFO_MODEL,
    INFO_QUERY,
    MAP_SIDE_PARAMETER,
    MODEL,
    OUTPUTS,
    encode_results,
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


def decode_image(data: bytes) -> np.ndarray:
    """JPEG/PNG/... bytes -> BGR uint8 frame; FrameError when OpenCV cannot decode them."""
    frame = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if frame is None:
        raise FrameError(f"{len(data)} bytes that OpenCV cannot decode as an image (JPEG, PNG, ...)")
    return frame


class InferenceServer:
    """A loaded Runtime behind a Triton server. ``start`` returns once Triton is ready; ``wait``
    blocks until SIGTERM or SIGINT, ``stop`` drains and stops (also on leaving a with block)."""

    def __init__(self, runtime: Runtime, options: ServeOptions) -> None:
        self.runtime = runtime
        self.options = options
        runtime.max_map_side = options.map_side_cap  # maps are made at the cap, shrunk per request
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

    def wait(self) -> None:
        """Serve until SIGTERM or SIGINT (or tritonserver dies), then stop gracefully."""

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
    def describe(self) -> dict[str, object]:
        """What the info model returns: tasks in distance order, calibration, engine and limits."""
        runtime = self.runtime
        return {
            "tasks": runtime.tasks,
            "task_status": runtime.task_status(),
            "uncalibrated": runtime.uncalibrated,
            "description": runtime.description,
            "precision": runtime.precision.value,
            "image_size": runtime.image_size,
            "max_batch": self.options.max_batch,
            "map_side_cap": self.options.map_side_cap,
            "engines": runtime.engine_stats.as_dict(),
            "failed_tasks": runtime.load_failures,
        }

    def _info(self, requests: list[Any]) -> list[dict[str, np.ndarray]]:
        text = json.dumps(self.describe()).encode()
        return [{INFO: np.array([text], np.bytes_)} for _ in requests]

    def _infer(self, requests: list[Any]) -> list[dict[str, np.ndarray]]:
        """One dynamic batch: every request's frames through one Runtime.infer, split back per request."""
        per_request = [self._frames(request) for request in requests]
        sides = [_map_side(request) for request in requests]
        frames = [f for frames, _ in per_request for f in frames if not isinstance(f, FrameResult)]
        computed = iter(self.runtime.infer(frames, with_maps=max(sides) > 0) if frames else [])
        replies = []
        for (items, decode_ms), side in zip(per_request, sides):
            results = [item if isinstance(item, FrameResult) else next(computed) for item in items]
            for k, result in enumerate(results):
                result.index = k
                result.timings.preprocess += decode_ms[k]
                if result.anomaly_map is not None:
                    result.anomaly_map = _fit_map(result.anomaly_map, min(side, self.options.map_side_cap))
            replies.append(encode_results(results, self.runtime.tasks))
        return replies

    def _frames(self, request: Any) -> tuple[list[np.ndarray | FrameResult], list[float]]:
        """A request's frames (decoded where encoded), a FrameResult with the error for a frame that is
        not one, and per frame the decoding milliseconds."""
        given = [name for name in (IMAGES, ENCODED) if name in request.data]
        batch = len(request[given[0]]) if given else 0
        if len(given) != 1:
            why = f"the request gives {' and '.join(given) or 'neither'} of {IMAGES}, {ENCODED}: send exactly one"
            return [FrameResult(index=k, error=why) for k in range(batch)], [0.0] * batch
        if given == [IMAGES]:
            return list(request[IMAGES]), [0.0] * batch
        items: list[np.ndarray | FrameResult] = []
        decode_ms = []
        for k, row in enumerate(request[ENCODED]):
            started = time.perf_counter()
            try:
                items.append(decode_image(bytes(row[0])))
            except FrameError as exc:
                items.append(FrameResult(index=k, error=str(exc)))
            decode_ms.append((time.perf_counter() - started) * 1e3)
        return items, decode_ms


def _map_side(request: Any) -> int:
    value = (request.parameters or {}).get(MAP_SIDE_PARAMETER, 0)
    try:
        return max(0, int(value))
    except (TypeError, ValueError):
        return 0


def _fit_map(anomaly_map: np.ndarray, side: int) -> np.ndarray | None:
    """The map shrunk so that its longer side is at most ``side`` (None for side 0: none asked)."""
    if side <= 0:
        return None
    height, width = capped_shape(anomaly_map.shape[:2], side)
    if (height, width) == anomaly_map.shape[:2]:
        return anomaly_map
    return cv2.resize(anomaly_map, (width, height), interpolation=cv2.INTER_AREA)


def serve_export(
    export_dir: str | Path,
    options: ServeOptions,
    say: Callable[[str], None],
    *,
    backend: str = "auto",
    precision: str | None = None,
    trusted_keys: list[str | Path] | None = None,
) -> int:
    """`moleflow-edge serve`: check and load the export once (signature with ``trusted_keys``, every
    task's graph), start Triton, serve until SIGTERM or SIGINT; the exit code (0 after a clean stop).
    What goes wrong before serving is one line through ``say``, never a traceback."""
    try:
        problem = serving_problem()
        if problem is not None:
            raise ServingUnavailable(problem)
        runtime = Runtime.load(export_dir, backend, precision, trusted_keys=trusted_keys, max_map_side=options.map_side_cap)
    except ServingUnavailable as exc:
        say(f"error: cannot serve here: {exc}")
        return EXIT_LOAD_ERROR
    except (ManifestError, BackendError, ValueError, OSError) as exc:
        say(f"error: cannot load the export {export_dir}: {exc}")
        return EXIT_LOAD_ERROR
    with runtime:
        try:
            runtime.check_graphs()
        except BackendError as exc:
            say(f"error: {exc}")
            return EXIT_LOAD_ERROR
        server = InferenceServer(runtime, options)
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
        server.wait()
    say("stopped: every accepted request was answered")
    return 0
