"""The wire format between the Triton model ``moleflow`` and its clients: model and tensor names,
dtypes and how a FrameResult travels as arrays. The server (server.py), the client (client.py) and the
model repository's Python-backend model (serving/triton/models/moleflow_model.py) all speak it.

Per request: a batch of raw frames ``images`` uint8 (B,H,W,3) BGR, or of encoded images ``encoded``
(B,1) bytes (JPEG, PNG, whatever OpenCV decodes); the request parameter ``map_side`` (a whole
number >= 0; 0 or absent: no map; anything else is an error on every frame of the request) asks for
anomaly maps whose longer side is at most that many pixels (and the server's cap), and ``explain``
(bool) for what a map implies without the map: each unknown frame's ``explained_by`` (the explaining
detectors run, as in Runtime.infer with maps). Per image back: the fields of FrameResult, one output
each; maps are zero-padded to the batch's largest map, ``map_shape`` says each one's own size.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping, Sequence

import cv2
import numpy as np

from moleflow_edge.anomaly_map import capped_shape
from moleflow_edge.preprocess import FrameError, check_frame
from moleflow_edge.runtime.result import STAGES, FrameResult
from moleflow_edge.runtime.runtime import Runtime

MODEL, INFO_MODEL = "moleflow", "moleflow_info"
CORE_MODEL = "moleflow_core"  # `serve`'s PyTriton model, behind ``moleflow`` (serving/triton/models/guard_model.py)
BACKBONE_MODEL = "moleflow_backbone"  # a model repository's graphs (export --format triton), which ``moleflow`` calls


def task_model(task: str) -> str:
    """The repository's model of one task's detector graph."""
    return f"moleflow_task_{task}"


IMAGES, ENCODED, MAP_SIDE_PARAMETER, EXPLAIN_PARAMETER = "images", "encoded", "map_side", "explain"
INFO_QUERY, INFO = "query", "info"
# output name -> (numpy dtype, per-image shape; -1 varies)
OUTPUTS: dict[str, tuple[type, tuple[int, ...]]] = {
    "task": (np.bytes_, (1,)),
    "error": (np.bytes_, (1,)),
    "explained_by": (np.bytes_, (1,)),
    "score": (np.float64, (1,)),  # float64: the JSON lines print scores to 6 decimals
    "threshold": (np.float64, (1,)),
    "decision": (np.int8, (1,)),  # -1: no decision (uncalibrated, unknown or error), 0 normal, 1 anomalous
    "distances": (np.float64, (-1,)),  # one per task, in the info model's task order
    "frame_shape": (np.int32, (3,)),
    "timings": (np.float32, (len(STAGES) + 1,)),  # STAGES, then engine_load, in ms
    "map_shape": (np.int32, (2,)),  # (0, 0) when no map was made
    "anomaly_map": (np.float32, (-1, -1)),
}
TIMING_FIELDS = (*STAGES, "engine_load")


def describe(runtime: Runtime, max_batch: int, map_side_cap: int) -> dict[str, object]:
    """What the info model returns: the tasks (the order of ``distances``), calibration, engine and limits."""
    return {
        "tasks": runtime.tasks,
        "task_status": runtime.task_status(),
        "uncalibrated": runtime.uncalibrated,
        "description": runtime.description,
        "precision": runtime.precision.value,
        "image_size": runtime.image_size,
        "max_batch": max_batch,
        "map_side_cap": map_side_cap,
        "engines": runtime.engine_stats.as_dict(),
        "failed_tasks": runtime.load_failures,
    }


def decode_image(data: bytes) -> np.ndarray:
    """An ``encoded`` item (JPEG/PNG/... bytes) -> BGR uint8 frame; FrameError when OpenCV cannot decode it."""
    frame = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if frame is None:
        raise FrameError(f"{len(data)} bytes that OpenCV cannot decode as an image (JPEG, PNG, ...)")
    return frame


def request_frames(inputs: Mapping[str, np.ndarray]) -> tuple[list[np.ndarray | FrameResult], list[float]]:
    """A request's frames (decoded where encoded; a FrameResult with the error for one that is not a
    frame) and per frame the decoding milliseconds. ``inputs``: the request's tensors by name."""
    given = [name for name in (IMAGES, ENCODED) if inputs.get(name) is not None]
    batch = len(inputs[given[0]]) if given else 0
    if len(given) != 1:
        why = f"the request gives {' and '.join(given) or 'neither'} of {IMAGES}, {ENCODED}: send exactly one"
        return [FrameResult(index=k, error=why) for k in range(batch)], [0.0] * batch
    if given == [IMAGES]:
        return list(inputs[IMAGES]), [0.0] * batch
    items: list[np.ndarray | FrameResult] = []
    decode_ms = []
    for k, row in enumerate(inputs[ENCODED]):
        started = time.perf_counter()
        try:
            items.append(decode_image(bytes(row[0])))
        except FrameError as exc:
            items.append(FrameResult(index=k, error=str(exc)))
        decode_ms.append((time.perf_counter() - started) * 1e3)
    return items, decode_ms


def refusal(
    shapes: Mapping[str, tuple[int, ...]], parameters: Mapping[str, object] | None
) -> dict[str, np.ndarray] | None:
    """What the model in front of `serve` answers itself, as a request's output arrays (the errors `run`
    and ``answer_requests`` give; ``distances`` empty: no task was asked), or None for a request to pass on:
    raw frames with no pixel (a zero-length side: PyTriton cannot carry them to serve), each frame's error;
    a bad ``map_side`` (a float one cannot travel as a BLS parameter), every frame's. ``shapes``: the
    request's input tensors' shapes by name (the guard need not read the frames). See serving/triton/models/guard_model.py."""
    images = shapes.get(IMAGES)
    errors = []
    if images is not None and not math.prod(images):
        for _ in range(images[0]):  # every frame is empty, so check_frame says why
            try:
                check_frame(np.empty(images[1:], np.uint8))
            except FrameError as exc:
                errors.append(str(exc))
    else:
        try:
            map_side(parameters, 1)
            return None
        except FrameError as exc:
            errors = [str(exc)] * max((shape[0] for shape in shapes.values()), default=0)
    return encode_results([FrameResult(index=k, error=why) for k, why in enumerate(errors)], [])


def map_side(parameters: Mapping[str, object] | None, cap: int) -> int:
    """The request's ``map_side`` parameter, capped at ``cap``; 0 (no map) when absent. FrameError (every
    frame of the request gets it) when it is not a whole number >= 0: a string, a fraction, a float, -5."""
    value = (parameters or {}).get(MAP_SIDE_PARAMETER, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise FrameError(
            f"the request parameter {MAP_SIDE_PARAMETER} must be a whole number of pixels >= 0 (0: no map), got {value!r}"
        )
    return min(value, cap)


def complete_results(
    items: list[np.ndarray | FrameResult], computed: Iterator[FrameResult], decode_ms: list[float], side: int
) -> list[FrameResult]:
    """A request's results: its frames' next results from ``computed`` in order (the request's own
    FrameResults where a frame was bad), decoding time added, maps shrunk to ``side`` (0: dropped)."""
    results = [item if isinstance(item, FrameResult) else next(computed) for item in items]
    for k, result in enumerate(results):
        result.index = k
        result.timings.preprocess += decode_ms[k]
        if result.anomaly_map is not None:
            result.anomaly_map = _fit_map(result.anomaly_map, side)
    return results


def answer_requests(
    runtime: Runtime,
    requests: Sequence[tuple[Mapping[str, np.ndarray], Mapping[str, object] | None]],
    map_side_cap: int,
) -> list[dict[str, np.ndarray]]:
    """Requests, each its input tensors by name and its parameters, through one Runtime.infer -> each
    request's output arrays: what `serve` and the repository's ``moleflow`` run. A request whose
    ``map_side`` is bad gets that error on every frame. Unknown frames are explained when any request
    asks for a map or ``explain``."""
    per_request = []
    for inputs, parameters in requests:
        items, decode_ms = request_frames(inputs)
        try:
            side = map_side(parameters, map_side_cap)
        except FrameError as exc:
            items, side = [FrameResult(index=k, error=str(exc)) for k in range(len(items))], 0
        per_request.append((items, decode_ms, side))
    explain = max(s for _, _, s in per_request) > 0 or any(
        bool((parameters or {}).get(EXPLAIN_PARAMETER)) for _, parameters in requests
    )
    frames = [f for items, _, _ in per_request for f in items if not isinstance(f, FrameResult)]
    computed = iter(runtime.infer(frames, with_maps=explain) if frames else [])
    return [
        encode_results(complete_results(items, computed, decode_ms, side), runtime.tasks)
        for items, decode_ms, side in per_request
    ]


def _fit_map(anomaly_map: np.ndarray, side: int) -> np.ndarray | None:
    if side <= 0:
        return None
    height, width = capped_shape(anomaly_map.shape[:2], side)
    if (height, width) == anomaly_map.shape[:2]:
        return anomaly_map
    return cv2.resize(anomaly_map, (width, height), interpolation=cv2.INTER_AREA)


def _text(value: str | None) -> bytes:
    return b"" if value is None else value.encode()


def _optional_float(value: float | None) -> float:
    return math.nan if value is None else value


def encode_results(results: list[FrameResult], tasks: list[str]) -> dict[str, np.ndarray]:
    """FrameResults of one request -> its output arrays (batch first)."""
    maps = [r.anomaly_map for r in results]
    height = max((m.shape[0] for m in maps if m is not None), default=1)
    width = max((m.shape[1] for m in maps if m is not None), default=1)
    padded = np.zeros((len(results), height, width), np.float32)
    for k, m in enumerate(maps):
        if m is not None:
            padded[k, : m.shape[0], : m.shape[1]] = m
    decision = [-1 if r.is_anomaly is None else int(r.is_anomaly) for r in results]
    return {
        "task": np.array([[_text(r.task)] for r in results], np.bytes_),
        "error": np.array([[_text(r.error)] for r in results], np.bytes_),
        "explained_by": np.array([[_text(r.explained_by)] for r in results], np.bytes_),
        "score": np.array([[_optional_float(r.image_score)] for r in results], np.float64),
        "threshold": np.array([[_optional_float(r.threshold)] for r in results], np.float64),
        "decision": np.array(decision, np.int8).reshape(-1, 1),
        "distances": np.array([[r.distances.get(t, math.nan) for t in tasks] for r in results], np.float64),
        "frame_shape": np.array([r.frame_shape or (0, 0, 0) for r in results], np.int32),
        "timings": np.array([[getattr(r.timings, s) for s in TIMING_FIELDS] for r in results], np.float32),
        "map_shape": np.array([(0, 0) if m is None else m.shape for m in maps], np.int32).reshape(-1, 2),
        "anomaly_map": padded,
    }


def decode_results(arrays: dict[str, np.ndarray], tasks: list[str]) -> list[FrameResult]:
    """One response's output arrays -> FrameResults, indexed from 0 in the request's order."""

    def text(name: str, k: int) -> str | None:
        raw = arrays[name][k][0]
        value = raw.decode() if isinstance(raw, bytes) else str(raw)
        return value or None

    def number(name: str, k: int) -> float | None:
        value = float(arrays[name][k][0])
        return None if math.isnan(value) else value

    results = []
    for k in range(len(arrays["task"])):
        result = FrameResult(index=k, error=text("error", k))
        results.append(result)
        for name, ms in zip(TIMING_FIELDS, arrays["timings"][k].tolist(), strict=True):
            setattr(result.timings, name, ms)
        shape = tuple(int(v) for v in arrays["frame_shape"][k])
        result.frame_shape = shape if any(shape) else None
        if result.error is not None:
            continue
        result.task, result.explained_by = text("task", k), text("explained_by", k)
        result.distances = dict(zip(tasks, arrays["distances"][k].astype(float).tolist(), strict=True))
        result.image_score, result.threshold = number("score", k), number("threshold", k)
        decision = int(arrays["decision"][k][0])
        result.is_anomaly = None if decision < 0 else bool(decision)
        h, w = (int(v) for v in arrays["map_shape"][k])
        if h and w:
            result.anomaly_map = np.ascontiguousarray(arrays["anomaly_map"][k, :h, :w])
    return results
