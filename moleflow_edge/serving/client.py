"""A Triton client with the Runtime's face: ``infer``/``infer_one`` return the same FrameResults, so the
camera loop (``run --server``) and Python code can use a server where they used a local Runtime.

``HOST:PORT`` or ``http://HOST:PORT`` talks to Triton's HTTP port, ``grpc://HOST:PORT`` to its gRPC
port. Every call has a deadline (LinkOptions), and every way the link can fail (refused, reset or
closed connections, a server silent past the deadline, gRPC UNAVAILABLE) is one path: tried again
``retries`` times, ``retry_delay_s`` apart, then ServerLost naming the server and the cause.
Frames travel raw (exact, what the local runtime sees) or encoded as PNG (lossless, smaller) or
JPEG (what most cameras send; lossy: it can change decisions, docs/serving.md).
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import cv2
import numpy as np

from moleflow_edge.contract import Precision
from moleflow_edge.errors import InputError
from moleflow_edge.preprocess import FrameError, check_frame, frame_list
from moleflow_edge.runtime.backend import BackendError
from moleflow_edge.runtime.engine_cache import EngineStats
from moleflow_edge.runtime.engine_select import EngineChoice
from moleflow_edge.runtime.inference_runtime import ServerLost
from moleflow_edge.runtime.options import DEFAULT_MAX_MAP_SIDE, LinkOptions
from moleflow_edge.runtime.result import FrameResult
from moleflow_edge.serving.protocol import (
    ENCODED,
    EXPLAIN_PARAMETER,
    IMAGES,
    INFO,
    INFO_MODEL,
    INFO_QUERY,
    MAP_SIDE_PARAMETER,
    MODEL,
    decode_results,
)

__all__ = ["ENCODINGS", "RemoteRuntime", "ServerLost", "link_failure"]

ENCODINGS = {"raw": None, "png": (".png", []), "jpeg": (".jpg", [cv2.IMWRITE_JPEG_QUALITY, 90])}
LINK = LinkOptions()  # the defaults of RemoteRuntime's deadlines and retries
# gRPC status codes and HTTP statuses (a proxy or balancer in front) that mean "the server is not there (now)"
UNREACHABLE = {"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "502", "503", "504"}


def link_failure(exc: BaseException, link: LinkOptions, deadline_s: float) -> str | None:
    """Why the link to the server failed, when ``exc`` is a transport failure worth a retry; None when
    the server answered (or ``exc`` is no transport's). Transport failures: refused, reset or closed
    connections (OSError; geventhttpclient's HTTPConnectionClosed is an http.client.HTTPException),
    socket timeouts, gRPC UNAVAILABLE or DEADLINE_EXCEEDED, 502-504 from a proxy in between.
    ``deadline_s``: the failed call's gRPC deadline."""
    from tritonclient.utils import InferenceServerException

    if isinstance(exc, InferenceServerException):
        status = str(exc.status())
        if status == "StatusCode.DEADLINE_EXCEEDED":
            return f"no answer within {deadline_s:g} s, gRPC DEADLINE_EXCEEDED"
        if status not in UNREACHABLE:
            return None
        name = status.removeprefix("StatusCode.") if status.startswith("StatusCode.") else f"HTTP {status}"
        return f"{name}: {exc.message().rstrip('.')}"
    if isinstance(exc, TimeoutError):  # HTTP: socket.timeout
        return f"timed out (connect deadline {link.connect_timeout_s:g} s, answer deadline {link.timeout_s:g} s)"
    if isinstance(exc, (OSError, http.client.HTTPException)):
        return f"{type(exc).__name__}: {str(exc).rstrip('.')}"
    return None


def _refusal(exc: BaseException) -> str | None:
    """The server's own message when it answered with an error (a malformed request, a model failure)."""
    from tritonclient.utils import InferenceServerException

    return exc.message() if isinstance(exc, InferenceServerException) else None


def parse_address(address: str) -> tuple[str, str]:
    """'HOST:PORT', 'http://HOST:PORT' or 'grpc://HOST:PORT' -> (protocol, 'HOST:PORT')."""
    protocol, _, rest = address.partition("://") if "://" in address else ("http", "", address)
    host, _, port = rest.rstrip("/").rpartition(":")
    if protocol not in ("http", "grpc") or not host or not port.isdigit():
        raise InputError(f"--server takes HOST:PORT (Triton's HTTP port) or grpc://HOST:PORT, got {address!r}")
    return protocol, f"{host}:{port}"


class RemoteRuntime:
    """The frames of ``infer`` go to the Triton model ``moleflow`` (moleflow-edge serve); one per thread,
    like Runtime, and an InferenceRuntime as Runtime is. Connects (with retries) on construction;
    ServerLost when it cannot."""

    max_map_side: int | None
    engine_choice: EngineChoice | None

    def __init__(
        self,
        address: str,
        *,
        encoding: str = "raw",
        retries: int = LINK.retries,
        retry_delay_s: float = LINK.retry_delay_s,
        connect_timeout_s: float = LINK.connect_timeout_s,
        timeout_s: float = LINK.timeout_s,
        max_map_side: int | None = DEFAULT_MAX_MAP_SIDE,
        maps: bool = True,
    ) -> None:
        if encoding not in ENCODINGS:
            raise InputError(f"unknown frame encoding {encoding!r}; choose one of: {', '.join(ENCODINGS)}")
        self.link = LinkOptions(connect_timeout_s, timeout_s, retries, retry_delay_s)  # checked there
        self.protocol, self.url = parse_address(address)
        self.encoding = encoding
        self.max_map_side = max_map_side  # like Runtime's; the server caps it further
        self.maps = maps  # False: never send maps back, whatever ``infer`` is told (they are most of the reply)
        self.engine_choice = None  # what the server chose is the server's; said in ``description``
        self._client: Any = None
        self._owner = threading.get_ident()
        self._lost = False  # the last call gave up: the summary does not wait on the server again
        self._info: dict[str, Any] = self._call(self._fetch_info, small=True)

    # --- transport -------------------------------------------------------------------------------
    def _module(self) -> Any:
        if self.protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
        return module

    def _connect(self) -> Any:
        """The tritonclient client, made in the calling thread (tritonclient.http's gevent client works only
        in the thread that made it, so a RemoteRuntime handed to another thread reconnects there). HTTP
        waits ``connect_timeout_s`` for a connection and ``timeout_s`` for each answer; gRPC takes its
        deadline per call (``_bound``)."""
        if self._client is not None and self._owner != threading.get_ident():
            self._client = None  # not closed: closing it from this thread would fail the same way
        if self._client is None:
            self._owner = threading.get_ident()
            module = self._module()
            if self.protocol == "grpc":
                self._client = module.InferenceServerClient(self.url)
            else:
                self._client = module.InferenceServerClient(
                    self.url, connection_timeout=self.link.connect_timeout_s, network_timeout=self.link.timeout_s
                )
        return self._client

    def _bound(self, small: bool) -> tuple[float, dict[str, float]]:
        """One call's deadline (readiness and info, ``small``: ``connect_timeout_s``; inference:
        ``timeout_s``) and the keywords that give it to a gRPC call; none for HTTP, whose client
        bounds every wait itself (``_connect``)."""
        deadline_s = self.link.connect_timeout_s if small else self.link.timeout_s
        return deadline_s, ({"client_timeout": deadline_s} if self.protocol == "grpc" else {})

    def _call(self, action: Callable[[Any, dict[str, float]], Any], *, small: bool = False) -> Any:
        """``action(client, bound)`` (``bound``: ``_bound``'s keywords), tried again while the link fails
        (``link_failure``, ``_lost_model``); after ``retries``, ServerLost naming the server and the
        causes. A request the server refuses while it still serves the model is a BackendError."""
        deadline_s, bound = self._bound(small)
        started, causes = time.monotonic(), []
        for attempt in range(self.link.retries + 1):
            client = self._connect()  # no I/O: both clients connect on their first call
            try:
                result = action(client, bound)
                self._lost = False
                return result
            except Exception as exc:  # sorted below: the link's failures, or not ours to catch
                cause = link_failure(exc, self.link, deadline_s)
                refused = _refusal(exc) if cause is None else None
                if cause is None and refused is None:
                    raise
                if refused is not None:
                    cause = self._lost_model(client, refused)
                    if cause is None:
                        raise BackendError(f"the server at {self.url} refused the request: {refused}") from exc
                assert cause is not None  # a link failure, or the model lost behind a refusal
                causes += [cause] if cause not in causes else []
                self.close()
                if attempt < self.link.retries:
                    time.sleep(self.link.retry_delay_s)
        self._lost = True
        tries = f"{self.link.retries + 1} time{'s' if self.link.retries else ''}"
        raise ServerLost(
            f"the inference server at {self.protocol}://{self.url} is not answering ({'; then '.join(causes)}); "
            f"tried {tries} over {time.monotonic() - started:.1f} s"
        )

    def _lost_model(self, client: Any, refused: str) -> str | None:
        """After a refusal: None when the server still serves ``moleflow`` (the request was at fault),
        else why the link counts as lost (a server shutting down or restarting unloads its models first)."""
        deadline_s, bound = self._bound(small=True)
        try:
            if client.is_model_ready(MODEL, **bound):
                return None
        except Exception as exc:  # the link failing now is the answer; anything else is not ours
            cause = link_failure(exc, self.link, deadline_s)
            if cause is None:
                raise
            return cause
        return f"its model {MODEL} is gone: {refused}"

    def _fetch_info(self, client: Any, bound: dict[str, float]) -> dict[str, Any]:
        if not client.is_model_ready(MODEL, **bound) or not client.is_model_ready(INFO_MODEL, **bound):
            raise OSError(
                f"the models {MODEL} and {INFO_MODEL} are not ready on {self.url} (is it moleflow-edge serve?)"
            )
        query = self._module().InferInput(INFO_QUERY, [1], "BYTES")
        query.set_data_from_numpy(np.array([b""], np.object_))
        reply = client.infer(INFO_MODEL, [query], **bound)
        return json.loads(reply.as_numpy(INFO)[0])

    def _request(self, name: str, data: np.ndarray, parameters: dict[str, object]) -> list[FrameResult]:
        module = self._module()
        tensor = module.InferInput(name, list(data.shape), "UINT8" if name == IMAGES else "BYTES")
        tensor.set_data_from_numpy(data)

        def send(client: Any, bound: dict[str, float]) -> Any:
            return client.infer(MODEL, [tensor], parameters=parameters or None, **bound)

        reply = self._call(send)
        outputs = reply.get_response()["outputs"] if self.protocol == "http" else reply.get_response().outputs
        arrays = {n: reply.as_numpy(n) for n in (o["name"] if isinstance(o, dict) else o.name for o in outputs)}
        if arrays["distances"].shape[1] != len(self.tasks):  # the server switched to a new export: its tasks
            self._info = self._call(self._fetch_info, small=True)
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
        # with_maps and no map sent back (``maps`` False): still what Runtime.infer gives, explained_by included
        parameters: dict[str, object] = (
            {MAP_SIDE_PARAMETER: side} if side else {EXPLAIN_PARAMETER: True} if with_maps else {}
        )
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
            for (i, _), result in zip(group, self._request(name, data, parameters), strict=True):
                result.index = i
                results[i] = result
        filled = [r for r in results if r is not None]
        assert len(filled) == len(results)  # every slot is filled above
        return filled

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
        """The server's engine cache as last heard (refreshed when the server answers at once; not asked
        again once the link was lost, so that a summary after ServerLost does not wait on it)."""
        if not self._lost:
            link, self.link = self.link, replace(self.link, retries=0)
            try:
                self._info = self._call(self._fetch_info, small=True)
            except (ServerLost, BackendError):
                pass
            finally:
                self.link = link
        d = self._info["engines"]
        seconds = {task: [ms / 1e3 for ms in values] for task, values in d["load_ms"].items()}
        return EngineStats(loads=d["loads"], unloads=d["unloads"], hits=d["hits"], load_seconds=seconds)

    def check_graphs(self) -> None:
        """The server loaded and checked every graph before it became ready: nothing to do here."""
        if self.load_failures:
            raise BackendError(f"detector graphs the server could not load: {self.load_failures}")

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
