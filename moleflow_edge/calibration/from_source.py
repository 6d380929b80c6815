"""`calibrate --source`: thresholds from good frames taken straight from the line's camera, video or
folder (good_frames.py), so the camera's own codec and light are in the threshold. Torch-free.

One task named: every frame is that product (the user says so), scored as it, as `calibrate
--data` does. Several tasks, or none (every task of the export): one mixed stream, and the
router's decision assigns each frame to a product exactly as `run` would route it; frames the
router stops as unknown are refused (counted in the record), and so are frames routed to a
product not being calibrated. The manifest's record says where the frames came from and how
many were read, taken, refused and used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moleflow_edge.calibration.order_statistics import MIN_NORMALS, TARGET_FPR, CalibrationError, min_normal_count
from moleflow_edge.calibration.thresholds import BATCH, CalibrationReport, NormalFrames, calibrate
from moleflow_edge.contract import Precision, load_manifest
from moleflow_edge.good_frames import GoodFrames, take_good_frames
from moleflow_edge.router import UNKNOWN


@dataclass
class SourceCalibration:
    """The calibration, the frames it took, and how the router assigned them (mixed streams)."""

    report: CalibrationReport
    frames: GoodFrames
    assigned: dict[str, int] = field(default_factory=dict)  # task -> frames used for it
    unknown: int = 0  # stopped by the router as an unknown product: refused
    elsewhere: int = 0  # routed to a task not being calibrated


def route_frames(export_dir: Path, images: list[np.ndarray], precision: Precision) -> list[str | None]:
    """Each frame's task (or UNKNOWN) as the export's router decides it at ``precision``, as `run` would
    (None: not a frame it can score, FrameResult.task)."""
    from moleflow_edge.runtime import Runtime, RuntimeOptions

    with Runtime.load(export_dir, RuntimeOptions("onnxruntime-cpu", precision)) as rt:
        return [r.task for s in range(0, len(images), BATCH) for r in rt.infer(images[s : s + BATCH], with_maps=False)]


def calibrate_from_source(
    export_dir: str | Path,
    source: str,
    tasks: list[str] | None = None,
    frames: int | None = None,
    target_fpr: float = TARGET_FPR,
    *,
    precision: Precision = Precision.FP32,
    sign: str | Path | None = None,
    trusted_keys: list[str | Path] | None = None,
    reason: str = "",
    progress: Callable[[GoodFrames], None] | None = None,
) -> SourceCalibration:
    """Take ``frames`` good frames (default: as many as ``target_fpr`` needs) from ``source`` and
    calibrate ``tasks`` on them (thresholds.calibrate: the same rule, record and history)."""
    root = Path(export_dir)
    known = load_manifest(root, verify=False).task_names  # a wrong name is refused before any frame is read
    chosen = known if not tasks else list(dict.fromkeys(tasks))
    if missing := [t for t in chosen if t not in known]:
        raise CalibrationError(f"tasks {missing} are not in {root} (tasks: {known})")
    wanted = frames or min_normal_count(target_fpr)
    taken = take_good_frames(source, wanted, MIN_NORMALS, progress)
    precision = Precision(precision)
    result = SourceCalibration(CalibrationReport(str(root), target_fpr, precision.value), taken)
    if len(chosen) == 1:
        per_task = {chosen[0]: list(taken.frames)}
        how = "the given task"
    else:
        per_task = {t: [] for t in chosen}
        for frame, task in zip(taken.frames, route_frames(root, taken.frames, precision), strict=True):
            if task == UNKNOWN:
                result.unknown += 1
            elif task in per_task:
                per_task[task].append(frame)
            else:
                result.elsewhere += 1
        how = "the router"
    result.assigned = {t: len(f) for t, f in per_task.items()}
    record = {**taken.record(), "frames_assigned_by": how, "frames_unknown_refused": result.unknown}
    normal = {t: NormalFrames(f, taken.source, record) for t, f in per_task.items()}
    result.report = calibrate(root, None, target_fpr, precision=precision, tasks=chosen, sign=sign,
                              trusted_keys=trusted_keys, frames=normal, reason=reason)  # fmt: skip
    return result
