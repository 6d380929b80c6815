"""A Triton client with the Runtime's face: ``infer``/``infer_one`` return the same FrameResults, so the
camera loop (``run --server``) and Python code can use a server where they used a local Runtime.

``HOST:PORT`` or ``http://HOST:PORT`` talks to Triton's HTTP port, ``grpc://HOST:PORT`` to its gRPC
port. A server that is down or drops is retried ``retries`` times, ``retry_delay_s`` apart, then
ServerLost. Frames travel raw (exact, what the local runtime sees) or encoded as PNG (lossless,
smaller) or JPEG (what most cameras send; lossy: it can change decisions, README, Serving).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np

from moleflow_edge.contract import Precision
from moleflow_edge.preprocess import FrameError, check_frame, frame_list
from moleflow_edge.runtime.backend import BackendError
from moleflow_edge.runtime.camera_loop import ServerLost
from moleflow_edge.runtime.engine_cache import EngineStats
from moleflow_edge.runtime.options import DEFAULT_MAX_MAP_SIDE
from moleflow_edge.runtime.result import FrameResult
from moleflow_edge.serving.protocol import (
    ENCODED,
    IMAGES,
    INFO,
    INFO_MODEL,
    INFO_QUERY,
    MAP_SIDE_PARAMETER,
    MODEL,
    decode_results,
)

__all__ = ["ENCODINGS", "RemoteRuntime", "ServerLost"]

ENCODINGS = {"raw": None, "png": (".png", []), "jpeg": (".jpg", [cv2.IMWRITE_JPEG_QUALITY, 90])}
# gRPC status codes and HTTP statuses that mean "the server is not there (now)", worth a retry
UNREACHABLE = {"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "503", "502", "504"}


def parse_address(address: str) -> tuple[str, str]:
    """'HOST:PORT', 'http://HOST:PORT' or 'grpc://HOST:PORT' -> (protocol, 'HOST:PORT')."""
    protocol, _, rest = address.partition("://") if "://" in address else ("http", "", address)
    host, _, port = rest.rstrip("/").rpartition(":")
    if protocol not in ("http", "grpc") or not host or not port.isdigit():
        raise ValueError(f"--server takes HOST:PORT (Triton's HTTP port) or grpc://HOST:PORT, got {address!r}")
    return protocol, f"{host}:{port}"


class RemoteRuntime:
    """The frames of ``infer`` go to the Triton model ``moleflow`` (moleflow-edge serve); one per thread,
    like Runtime. Connects (with retries) on construction; ServerLost when it cannot."""

    def __init__(
        self,
        address: str,
        *,
        encoding: str = "raw",
        retries: int = 5,
        retry_delay_s: float = 1.0,
        timeout_s: float = 60.0,
        max_map_side: int | None = DEFAULT_MAX_MAP_SIDE,
        maps: bool = True,
    ) -> None:
        if encoding not in ENCODINGS:
            raise ValueError(f"unknown frame encoding {encoding!r}; choose one of: {', '.join(ENCODINGS)}")
        if retries < 0 or retry_delay_s < 0:
            raise ValueError("retries and retry_delay_s must be >= 0")
        self.protocol, self.url = parse_address(address)
        self.encoding, self.retries, self.retry_delay_s, self.timeout_s = encoding, retries, retry_delay_s, timeout_s
        self.max_map_side = max_map_side  # like Runtime's; the server caps it further
        self.maps = maps  # False: never ask for maps, whatever ``infer`` is told (they are most of the reply)
        self.engine_choice = None  # what the server chose is the server's; said in ``description``
        self._client: Any = None
        self._owner = threading.get_ident()
        self._info: dict[str, Any] = self._call(self._fetch_info)

    # --- transport -------------------------------------------------------------------------------
    def _module(self) -> Any:
        if self.protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
        return module

    def _connect(self) -> Any:
        """The tritonclient client, made in the calling thread (tritonclient.http's gevent client works only
        in the thread that made it, so a RemoteRuntime handed to another thread reconnects there)."""
        if self._client is not None and self._owner != threading.get_ident():
            self._client = None  # not closed: closing it from this thread would fail the same way
        if self._client is None:
            self._owner = threading.get_ident()
            module = self._module()
            if self.protocol == "grpc":
                self._client = module.InferenceServerClient(self.url)
            else:
                self._client = module.InferenceServerClient(
                    self.url, connection_timeout=self.timeout_s, network_timeout=self.timeout_s
                )
        return self._client

    def _call(self, action: Callable[[Any], Any]) -> Any:
        """``action(client)``, retried while the server is unreachable; ServerLost after ``retries``."""
        from tritonclient.utils import InferenceServerException

        for attempt in range(self.retries + 1):
            try:
                return action(self._connect())
            except (OSError, InferenceServerException) as exc:
                status = exc.status() if isinstance(exc, InferenceServerException) else None
                if isinstance(exc, InferenceServerException) and str(status) not in UNREACHABLE:
                    raise BackendError(f"the server at {self.url} refused the request: {exc.message()}") from exc
                reason = f"{type(exc).__name__}: {exc}"
                self.close()
                if attempt < self.retries:
                    time.sleep(self.retry_delay_s)
        raise ServerLost(
            f"the inference server at {self.protocol}://{self.url} is not answering ({reason}); "
            f"tried {self.retries + 1} times over {self.retries * self.retry_delay_s:.1f} s"
        )

    def _fetch_info(self, client: Any) -> dict[str, Any]:
        if not client.is_model_ready(MODEL) or not client.is_model_ready(INFO_MODEL):
            raise OSError(
                f"the models {MODEL} and {INFO_MODEL} are not ready on {self.url} (is it moleflow-edge serve?)"
            )
        query = self._module().InferInput(INFO_QUERY, [1], "BYTES")
        query.set_data_from_numpy(np.array([b""], np.object_))
        reply = client.infer(INFO_MODEL, [query])
        return json.loads(reply.as_numpy(INFO)[0])

    def _request(self, name: str, data: np.ndarray, map_side: int) -> list[FrameResult]:
        module = self._module()
        tensor = module.InferInput(name, list(data.shape), "UINT8" if name == IMAGES else "BYTES")
        tensor.set_data_from_numpy(data)
        parameters = {MAP_SIDE_PARAMETER: map_side} if map_side else None

        def send(client: Any) -> Any:
            return client.infer(MODEL, [tensor], parameters=parameters)

        reply = self._call(send)
        outputs = reply.get_response()["outputs"] if self.protocol == "http" else reply.get_response().outputs
        arrays = {n: reply.as_numpy(n) for n in (o["name"] if isinstance(o, dict) else o.name for o in outputs)}
        if arrays["distances"].shape[1] != len(self.tasks):  # the server switched to a new export: its tasks
            self._info = self._call(self._fetch_info)
        return decode_results(arrays, self.tasks)

    # --- inference -------------------------------------------------------------------------------
    def infer(self, frames: object, *, with_maps: bool = True) -> list[FrameResult]:
        """Like Runtime.infer: one FrameResult per frame, in input order; a bad frame gets ``error``.
        Requests hold at most the server's max batch; raw frames of different sizes go separately."""
        items = frame_list(frames)
        results: list[FrameResult | None] = [None] * len(items)
        payload: list[tuple[int, np.ndarray | bytes]] = []
        for i, frame in enumerate(items):
            try:
                payload.append((i, self._encode(check_frame(frame))))
            except FrameError as exc:
                results[i] = FrameResult(index=i, error=str(exc))
        side = (self.max_map_side or self._info["map_side_cap"]) if with_maps and self.maps else 0
        step = int(self._info["max_batch"])
        while payload:
            first_shape = _shape(payload[0][1])
            group = [p for p in payload if _shape(p[1]) == first_shape][:step]
            taken = {i for i, _ in group}
            payload = [p for p in payload if p[0] not in taken]
            if self.encoding == "raw":
                data, name = np.stack([g[1] for g in group]), IMAGES
            else:
                data, name = np.array([[g[1]] for g in group], np.object_), ENCODED
            for (i, _), result in zip(group, self._request(name, data, side)):
                result.index = i
                results[i] = result
        return results  # type: ignore[return-value] - every slot is filled above

    def infer_one(self, frame: object, *, with_maps: bool = True) -> FrameResult:
        return self.infer([frame], with_maps=with_maps)[0]

    def _encode(self, frame: np.ndarray) -> np.ndarray | bytes:
        spec = ENCODINGS[self.encoding]
        if spec is None:
            return frame
        ok, data = cv2.imencode(spec[0], frame, spec[1])
        if not ok:
            raise FrameError(f"OpenCV could not encode the frame as {self.encoding}")
        return data.tobytes()

    # --- what the server loaded (the camera loop's start-up lines and summary) --------------------
    @property
    def tasks(self) -> list[str]:
        return list(self._info["tasks"])

    @property
    def uncalibrated(self) -> list[str]:
        return list(self._info["uncalibrated"])

    def task_status(self) -> dict[str, str]:
        return dict(self._info["task_status"])

    @property
    def load_failures(self) -> dict[str, str]:
        return dict(self._info["failed_tasks"])

    @property
    def precision(self) -> Precision:
        return Precision(self._info["precision"])

    @property
    def image_size(self) -> int:
        return int(self._info["image_size"])

    @property
    def description(self) -> str:
        return f"Triton at {self.protocol}://{self.url} ({self._info['description']}, frames sent {self.encoding})"

    @property
    def engine_stats(self) -> EngineStats:
        """The server's engine cache as last heard (refreshed when the server answers at once)."""
        retries, self.retries = self.retries, 0
        try:
            self._info = self._call(self._fetch_info)
        except (ServerLost, BackendError):
            pass
        finally:
            self.retries = retries
        d = self._info["engines"]
        seconds = {task: [ms / 1e3 for ms in values] for task, values in d["load_ms"].items()}
        return EngineStats(loads=d["loads"], unloads=d["unloads"], hits=d["hits"], load_seconds=seconds)

    def check_graphs(self) -> None:
        """The server loaded and checked every graph before it became ready: nothing to do here."""
        if self.load_failures:
            raise BackendError(f"flow graphs the server could not load: {self.load_failures}")

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> RemoteRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _shape(item: np.ndarray | bytes) -> tuple[int, ...]:
    return item.shape if isinstance(item, np.ndarray) else ()
