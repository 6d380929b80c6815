"""The wire format between the Triton model ``moleflow`` and its clients: tensor names, dtypes and
how a FrameResult travels as arrays. The server (server.py), the client (client.py) and the model
repository's Python-backend model (export/triton_repository.py) all speak it.

Per request: a batch of raw frames ``images`` uint8 (B,H,W,3) BGR, or of encoded images ``encoded``
(B,1) bytes (JPEG, PNG, whatever OpenCV decodes); the request parameter ``map_side`` (int, 0 or
absent: no map) asks for anomaly maps whose longer side is at most that many pixels (and the
server's cap). Per image back: the fields of FrameResult, one output each; maps are zero-padded to
the batch's largest map, ``map_shape`` says each one's own size.
"""

from __future__ import annotations

import math

import numpy as np

from moleflow_edge.runtime.result import STAGES, FrameResult

MODEL, INFO_MODEL = "moleflow", "moleflow_info"
IMAGES, ENCODED, MAP_SIDE_PARAMETER = "images", "encoded", "map_side"
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


def decode_results(arrays: dict[str, np.ndarray], tasks: list[str], first_index: int = 0) -> list[FrameResult]:
    """One response's output arrays -> FrameResults (indices from ``first_index``)."""

    def text(name: str, k: int) -> str | None:
        raw = arrays[name][k][0]
        value = raw.decode() if isinstance(raw, bytes) else str(raw)
        return value or None

    def number(name: str, k: int) -> float | None:
        value = float(arrays[name][k][0])
        return None if math.isnan(value) else value

    results = []
    for k in range(len(arrays["task"])):
        result = FrameResult(index=first_index + k, error=text("error", k))
        results.append(result)
        for name, ms in zip(TIMING_FIELDS, arrays["timings"][k].tolist()):
            setattr(result.timings, name, ms)
        shape = tuple(int(v) for v in arrays["frame_shape"][k])
        result.frame_shape = shape if any(shape) else None
        if result.error is not None:
            continue
        result.task, result.explained_by = text("task", k), text("explained_by", k)
        result.distances = dict(zip(tasks, arrays["distances"][k].astype(float).tolist()))
        result.image_score, result.threshold = number("score", k), number("threshold", k)
        decision = int(arrays["decision"][k][0])
        result.is_anomaly = None if decision < 0 else bool(decision)
        h, w = (int(v) for v in arrays["map_shape"][k])
        if h and w:
            result.anomaly_map = np.ascontiguousarray(arrays["anomaly_map"][k, :h, :w])
    return results
