"""What the runtime returns per frame: a typed result, never a loose dict or tuple."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moleflow_edge.router import UNKNOWN

__all__ = ["STAGES", "UNKNOWN", "FrameResult", "StageTimings"]

STAGES = ("preprocess", "backbone", "routing", "detector", "postprocess")


@dataclass
class StageTimings:
    """Milliseconds per stage as seen by one frame.

    ``preprocess`` and ``postprocess`` are the frame's own; ``backbone`` and ``routing`` are the
    wall time of the batch the frame was in, ``detector`` that of its task's graph (including a lazy
    engine load, which ``engine_load`` shows separately): what the frame waited for.
    """

    preprocess: float = 0.0
    backbone: float = 0.0
    routing: float = 0.0
    detector: float = 0.0  # the task's detector graph (flow or memory bank), over its task group
    postprocess: float = 0.0
    engine_load: float = 0.0

    @property
    def total(self) -> float:
        return self.preprocess + self.backbone + self.routing + self.detector + self.postprocess

    def as_dict(self) -> dict[str, float]:
        stages = {name: round(getattr(self, name), 3) for name in STAGES}
        if self.engine_load:
            stages["engine_load"] = round(self.engine_load, 3)
        stages["total"] = round(self.total, 3)
        return stages


@dataclass
class FrameResult:
    """One frame's outcome, in the order the frames were given.

    task: a product name, UNKNOWN (farther than every task's distance limit), or None when the
    frame itself was bad (``error`` says why). distances: squared Mahalanobis distance to every
    task prototype. image_score: mean of the top-K patch scores (None unless routed to a task).
    is_anomaly: image_score > the task's calibrated threshold (None when not calibrated).
    anomaly_map: (H,W) float32 at the frame's own resolution, its longer side capped at the
    runtime's max_map_side (2048 px by default); patch_scores: (grid, grid).
    explained_by: for an UNKNOWN frame whose maps were asked for, the nearby task whose detector explains
    it best (often a damaged part of that product); its patch scores and map are that detector's, while
    image_score and is_anomaly stay None: the frame matched no product, so the line stops it.
    """

    index: int
    task: str | None = None
    distances: dict[str, float] = field(default_factory=dict)
    image_score: float | None = None
    threshold: float | None = None
    is_anomaly: bool | None = None
    anomaly_map: np.ndarray | None = None
    patch_scores: np.ndarray | None = None
    frame_shape: tuple[int, ...] | None = None
    explained_by: str | None = None
    timings: StageTimings = field(default_factory=StageTimings)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def is_unknown(self) -> bool:
        return self.task == UNKNOWN

    @property
    def nearest_task(self) -> str | None:
        """The closest prototype, even for an unknown frame (useful when setting distance limits)."""
        return min(self.distances, key=self.distances.__getitem__) if self.distances else None

    def decide(self, threshold: float | None) -> None:
        """The decision rule: anomalous when the image score is above the task's threshold at the loaded
        precision; none without a threshold."""
        self.threshold = threshold
        self.is_anomaly = None if threshold is None or self.image_score is None else bool(self.image_score > threshold)

    def summary(self) -> dict[str, object]:
        """JSON-ready fields (no arrays): what the camera loop prints per frame."""
        if self.error is not None:
            return {"index": self.index, "error": self.error}
        nearest = self.nearest_task
        return {
            "index": self.index,
            "task": self.task,
            "score": None if self.image_score is None else round(self.image_score, 6),
            "threshold": self.threshold,
            "anomaly": self.is_anomaly,
            "nearest_task": nearest,
            "explained_by": self.explained_by,
            "distance": None if nearest is None else round(self.distances[nearest], 4),
            "latency_ms": self.timings.as_dict(),
        }
