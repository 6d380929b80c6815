"""Score thresholds and routing distance limits from normal images, written into the manifest.

Torch-free: runs on the line PC with the runtime alone (numpy, OpenCV, onnxruntime).

Which images. Per task, the normal images of ``ROOT/<task>/calib/good`` when that folder
exists (a held-out set the user keeps for this), else ``ROOT/<task>/test/good``. Never
``train/good``: the task's detector was fitted to those images, so their scores are optimistically low
and a threshold set on them gives more false alarms than asked for.

Threshold rule: ``order_statistics.py``. Real-size data (MVTec-style test/good folders hold 20-60 normal images) often has fewer normals
than the requested rate needs. ``calibrate`` then still sets a usable threshold by the tightest
rate the data supports: t = the largest normal score (k = 1), whose expected FPR is 1/(n+1)
(0.09 with 10 images), and it says so: the method, the rate reached, its 95 % bound, and how
many images the requested rate would need. Below ``MIN_NORMALS`` images it refuses.

Routing limit. By the rule the router was fitted with (``router.distance_limit``, its quantile
and margin read from the manifest, where export records the model's config): the squared
Mahalanobis distances to the task's own prototype of the normal images and of their JPEG round
trips at each ``CAMERA_JPEG_QUALITIES`` (what an MJPEG camera sends of a good part), their
``router_limit_quantile`` x ``router_limit_margin`` (x the few-image widening below 10 images).
These images were not used to fit the prototype, so their distances are honest held-out ones,
as the router's folds are; with the round trips a compressed good frame keeps the tolerance
training gave it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from moleflow_edge.augment import CAMERA_JPEG_QUALITIES, jpeg_round_trips
from moleflow_edge.calibration.manifest_update import ManifestUpdate, record_threshold
from moleflow_edge.calibration.order_statistics import (
    MIN_NORMALS,
    TARGET_FPR,
    CalibrationError,
    f1_optimal,
    min_normal_count,
    precision_recall,
    supported_threshold,
)
from moleflow_edge.contract import CalibrationRecord, Manifest, Precision
from moleflow_edge.data.mvtec import GOOD, DatasetError, _image_files, test_samples, train_samples
from moleflow_edge.metrics import auroc
from moleflow_edge.preprocess import read_image_bgr, resize_frame
from moleflow_edge.router import distance_limit, limit_widening

if TYPE_CHECKING:
    from moleflow_edge.runtime import Runtime

__all__ = ["CALIB_FOLDER", "CalibrationReport", "NormalFrames", "TaskCalibration", "calibrate"]

CALIB_FOLDER = "calib"  # ROOT/<task>/calib/good: held-out normal images, preferred over test/good
BATCH = 8


@dataclass
class NormalFrames:
    """A task's normal frames taken from a source instead of a dataset folder (calibration/from_source.py)."""

    images: list[np.ndarray]  # BGR uint8, as the source delivered them
    source: str  # where they came from, for the record
    record: dict = field(default_factory=dict)  # more about them for the manifest's record (counts)


# --- scoring through the runtime -----------------------------------------------------------------
def normal_images(data_root: Path, task: str) -> tuple[list[Path], str]:
    """The calibration images of ``task`` and the folder they came from (relative to the root)."""
    held_out = data_root / task / CALIB_FOLDER / GOOD
    folder = held_out if held_out.is_dir() else data_root / task / "test" / GOOD
    if not folder.is_dir():
        raise CalibrationError(
            f"no normal images for task {task!r}: neither {held_out} nor {folder} exists; "
            f"put held-out normal images in {held_out}"
        )
    return _image_files(folder), folder.relative_to(data_root).as_posix()


def score_as_task(runtime: Runtime, batches: Iterable[np.ndarray], task: str) -> tuple[np.ndarray, np.ndarray]:
    """Oracle scoring of ``resized_batches``: image scores (n,) under ``task``'s detector, and distances
    (n,T) to every prototype.

    Calibration knows the product, so it bypasses routing: a normal image misrouted to another
    task still counts for its own task's threshold.
    """
    scores, distances = [], []
    for images in batches:
        image_scores, image_distances = runtime.score_as(images, task)
        scores.append(image_scores)
        distances.append(image_distances)
    return np.concatenate(scores), np.concatenate(distances).astype(np.float64)


def round_trip_distances(runtime: Runtime, batches: Iterable[np.ndarray]) -> np.ndarray:
    """Distances (Q*n,T) to every prototype of the JPEG round trips of ``resized_batches``' images at each
    CAMERA_JPEG_QUALITIES, the variants the router's prototypes and limits were fitted with."""
    trips = [runtime.routing_distances(t) for b in batches for t in jpeg_round_trips(b)]
    return np.concatenate(trips).astype(np.float64)


def resized_batches(runtime: Runtime, files: list[Path] | list[np.ndarray]) -> Iterator[np.ndarray]:
    """(B,S,S,3) batches of image files or frames already read, resized for the runtime."""
    for start in range(0, len(files), BATCH):
        batch = [f if isinstance(f, np.ndarray) else read_image_bgr(f) for f in files[start : start + BATCH]]
        yield np.stack([resize_frame(frame, runtime.image_size) for frame in batch])


# --- the report ------------------------------------------------------------------------------------
@dataclass
class TaskCalibration:
    task: str
    source: str  # folder relative to the data root
    n: int
    threshold: float
    k: int
    expected_fpr: float
    fpr_upper95: float
    distance_limit: float
    max_normal_distance: float  # the largest distance the limit was set from (round trips included)
    routed_to_own_task: float  # fraction of the normal images the router sends to this task
    defects: int = 0
    precision: float | None = None  # at the chosen threshold, on test/<defect> + the normal images
    recall: float | None = None
    f1: float | None = None
    f1_optimal_threshold: float | None = None
    f1_optimal: float | None = None
    image_auroc: float | None = None  # normal vs test/<defect> images, at the calibrated precision
    method: str = ""  # how the threshold was made
    target_met: bool = True
    train_images: int | None = None  # good images in ROOT/<task>/train/good, which the task was learned from


@dataclass
class CalibrationReport:
    export_dir: str
    target_fpr: float
    precision: str
    tasks: list[TaskCalibration] = field(default_factory=list)
    int8_calibration: dict = field(default_factory=dict)  # provenance of the INT8 QDQ scales, from the manifest

    def as_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """Markdown table, one row per task."""
        lines = [
            (
                "| task | source | n | k | threshold | E[FPR] | FPR 95% bound | distance limit | precision "
                "| recall | F1-opt threshold |"
            ),
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]

        def fmt(v: float | None, spec: str = ".3f") -> str:
            return "-" if v is None else format(v, spec)

        for t in self.tasks:
            lines.append(
                f"| {t.task} | {t.source} | {t.n} | {t.k} | {t.threshold:.4g} | {t.expected_fpr:.4f} "
                f"| {t.fpr_upper95:.4f} | {t.distance_limit:.4g} | {fmt(t.precision)} | {fmt(t.recall)} "
                f"| {fmt(t.f1_optimal_threshold, '.4g')} |"
            )
        for t in self.tasks:  # how each threshold was made, and how certain it is
            note = "" if t.target_met else f"target {self.target_fpr:g} NOT reached: "
            auc = "" if t.image_auroc is None else f"; image AUROC {t.image_auroc:.4f} at {self.precision}"
            lines.append(f"{t.task}: {note}{t.method}; 95% bound on its FPR {t.fpr_upper95:.3f}{auc}")
        return "\n".join(lines)


def calibrate(
    export_dir: str | Path,
    data_root: str | Path | None,
    target_fpr: float = TARGET_FPR,
    min_count: int | None = None,
    *,
    confidence: float | None = None,
    precision: Precision = Precision.FP32,
    tasks: list[str] | None = None,
    threads: int | None = None,
    write: bool = True,
    sign: str | Path | None = None,
    trusted_keys: list[str | Path] | None = None,
    frames: dict[str, NormalFrames] | None = None,
    reason: str = "",
) -> CalibrationReport:
    """Set every task's score threshold and routing distance limit from its normal images.

    Too few images for ``target_fpr`` give the tightest rate the data supports (see the module
    docstring); fewer than ``min_count`` (default MIN_NORMALS) images are refused. ``sign``: the
    private key file that signs the calibrated manifest (required when the export was signed: the
    existing signature must verify with its public half or ``trusted_keys`` first, so that a
    tampered export is never signed again); an unsigned export is refused, since only export
    --sign from the model makes one known good. Scores go through the runtime (onnxruntime CPU,
    ``precision`` graphs: calibrate the precision you deploy). Writes that precision's threshold
    and calibration record, the distance_limit and, where defect images exist, that precision's
    image AUROC per task into the manifest atomically; other precisions' records are kept, and a
    Triton repository in EXPORT/triton gets the new manifest (serving/triton/decisions.py). A threshold
    that changes enters the task's threshold_history with the time and why (``reason`` added);
    an unchanged one does not, so calibrating twice gives a byte-identical manifest. ``frames``:
    each task's normal frames taken from a source, instead of ``data_root``'s folders.
    """
    from moleflow_edge.runtime import Runtime, RuntimeOptions

    root = Path(export_dir)
    update = ManifestUpdate.open(root, sign, trusted_keys, write)  # UpdateError: signed without --sign
    manifest, data = update.manifest, None if data_root is None else Path(data_root)
    if (data is None) == (frames is None):
        raise CalibrationError("calibrate takes either a dataset root or frames taken from a source")
    chosen = manifest.task_names if tasks is None else list(tasks)
    min_normal_count(target_fpr, confidence)  # checks the rate before any image is scored
    needed = max(min_count or 0, MIN_NORMALS)
    precision = Precision(precision)
    report = CalibrationReport(str(root), target_fpr, precision.value, int8_calibration=dict(manifest.int8_calibration))
    runtime = Runtime.load(root, RuntimeOptions("onnxruntime-cpu", precision, threads=threads))
    try:
        for name in chosen:
            entry = manifest.task(name)
            files: list[Path] | list[np.ndarray]
            if frames is not None:
                files, source, record = frames[name].images, frames[name].source, frames[name].record
            else:
                assert data is not None  # exactly one of data_root and frames, checked above
                (files, source), record = normal_images(data, name), {}
            if len(files) < needed:
                where = f"{source} gave" if data is None else f"{data / source} has"
                add = "take more frames" if data is None else (
                    f"add held-out normal images to {data / name / CALIB_FOLDER / GOOD}")  # fmt: skip
                raise CalibrationError(
                    f"task {name!r}: {where} {len(files)} normal images; calibration needs at least {needed}: {add}"
                )
            batches = list(resized_batches(runtime, files))  # read and resized once for both uses
            scores, all_distances = score_as_task(runtime, batches, name)
            column = runtime.router.tasks.index(name)
            distances = np.concatenate([all_distances, round_trip_distances(runtime, batches)])[:, column]
            rule = supported_threshold(scores, target_fpr, confidence=confidence)
            routed = float(np.mean(np.argmin(all_distances, axis=1) == column))
            limit = distance_limit(distances, len(files), manifest.router_limit_quantile, manifest.router_limit_margin)
            result = TaskCalibration(
                task=name, source=source, n=rule.n, threshold=rule.threshold, k=rule.k,
                expected_fpr=rule.expected_fpr, fpr_upper95=rule.fpr_upper95, distance_limit=limit,
                max_normal_distance=float(distances.max()), routed_to_own_task=routed,
                method=rule.method, target_met=rule.target_met,
                train_images=None if data is None else _train_images(data, name),
            )  # fmt: skip
            if data is not None:
                _defect_metrics(runtime, data, name, scores, result)
            report.tasks.append(result)
            why = f"calibrate: target FPR {target_fpr:g} on {rule.n} normal images from {source}"
            record_threshold(entry, precision, rule.threshold, why + (f": {reason}" if reason else ""))
            entry.distance_limit = limit
            entry.calibrations[precision] = CalibrationRecord(
                precision, rule.method, n=rule.n, k=rule.k, target_fpr=target_fpr, expected_fpr=rule.expected_fpr,
                fpr_upper95=rule.fpr_upper95, target_met=rule.target_met, source=source,
                distance_limit_method=limit_method(manifest, len(files)),
                max_normal_distance=result.max_normal_distance, **record,
            )  # fmt: skip
            if result.image_auroc is None:  # no defect images now: an earlier figure for this precision would mislead
                entry.image_auroc.pop(precision, None)
            else:
                entry.image_auroc[precision] = result.image_auroc
    finally:
        runtime.close()
    if write:  # scoring took a while: an export or calibration meanwhile is refused (UpdateError), not overwritten
        update.commit()  # and EXPORT/triton serves the new thresholds and limits too
    return report


def limit_method(manifest: Manifest, images: int) -> str:
    """How ``calibrate`` set a task's routing limit from ``images`` images, for the calibration record."""
    qualities = ", ".join(map(str, CAMERA_JPEG_QUALITIES))
    return (f"router rule: {manifest.router_limit_margin:g} x widening {limit_widening(images):.2f} x the "
            f"{manifest.router_limit_quantile:g} quantile of squared Mahalanobis distances of the same images "
            f"and their JPEG round trips (quality {qualities})")  # fmt: skip


def _train_images(data: Path, task: str) -> int | None:
    """How many good images ``task`` was learned from, counted in the data root (None without train/good)."""
    try:
        return len(train_samples(data, task))
    except DatasetError:
        return None


def _defect_metrics(runtime: Runtime, data: Path, task: str, normal: np.ndarray, result: TaskCalibration) -> None:
    """Precision/recall at the chosen threshold, the F1-optimal threshold and the image AUROC (which
    latency-target engine selection ranks precisions by), where test/<defect> exists."""
    try:
        defects = [s.path for s in test_samples(data, task) if s.label == 1]
    except DatasetError:
        return
    if not defects:
        return
    anomalous, _ = score_as_task(runtime, resized_batches(runtime, defects), task)
    scores = np.concatenate([normal, anomalous])
    labels = np.concatenate([np.zeros(len(normal), bool), np.ones(len(anomalous), bool)])
    result.defects = len(defects)
    result.precision, result.recall, result.f1 = precision_recall(scores, labels, result.threshold)
    result.f1_optimal_threshold, result.f1_optimal = f1_optimal(scores, labels)
    result.image_auroc = auroc(labels, scores)
