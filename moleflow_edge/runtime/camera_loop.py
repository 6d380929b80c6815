"""`moleflow-edge run`: a folder, an image, a video, a camera, a stream URL or a GStreamer pipeline
through the runtime, one JSON line per frame.

stdout gets one JSON object per frame (source, task, score, decision, latency per stage in
ms), or {"error": ...} for a frame that could not be read or processed, and a last line
{"summary": {...}}; stderr gets the same summary for people. A camera or stream that stops
delivering frames is reopened a bounded number of times, then the loop exits non-zero;
Ctrl-C ends it with the summary.
"""

from __future__ import annotations

import json
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import cv2
import numpy as np

from moleflow_edge.atomic import check_writable
from moleflow_edge.contract import ManifestError
from moleflow_edge.preprocess import FrameError, read_image_bgr
from moleflow_edge.router import UNKNOWN
from moleflow_edge.runtime.backend import BackendError
from moleflow_edge.runtime.engine_select import LatencyTargetWarning
from moleflow_edge.runtime.folder_follow import follow_folder
from moleflow_edge.runtime.latency_stats import LatencyReservoir
from moleflow_edge.runtime.live_export import LiveExport
from moleflow_edge.runtime.options import RunOptions
from moleflow_edge.runtime.overlay import Viewer, render_overlay, write_png
from moleflow_edge.runtime.result import STAGES, FrameResult
from moleflow_edge.runtime.runtime import Runtime
from moleflow_edge.runtime.video_io import is_pipeline, is_stream_url, redact, unsupported

EXIT_OK = 0
EXIT_LOAD_ERROR = 1  # the export cannot be loaded (missing, tampered, no backend)
EXIT_SOURCE_ERROR = 2  # the source cannot be opened or holds no image
EXIT_CAMERA_LOST = 3  # a camera, a stream or the inference server (run --server) stopped and did not come back
EXIT_BACKEND_ERROR = 4  # the inference engine failed mid-run (device lost, out of memory)
EXIT_ALL_FRAMES_FAILED = 5  # frames were read, but not one of them could be processed
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), after the summary

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pbm", ".pgm", ".ppm", ".jp2"})
VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".m4v", ".mpg", ".mpeg", ".wmv", ".webm"})
CAMERA = re.compile(r"camera:(\d+)")
# a stalled stream (connected, no frames) must not block a read forever: OpenCV's FFmpeg timeouts
STREAM_TIMEOUT_MS = 5000


class SourceError(RuntimeError):
    """The source cannot be opened or read at all."""


class CameraLost(SourceError):
    """A camera or stream stopped delivering frames and reopening it did not help."""


class ServerLost(RuntimeError):
    """The inference server (run --server) stopped answering and retrying did not help."""


@dataclass
class SourceFrame:
    """One frame from a source, or why it could not be read."""

    index: int
    name: str
    frame: np.ndarray | None
    error: str | None = None
    read_ms: float = 0.0
    stem: str = "frame"  # overlay file name: the image's stem, or "frame" for video and camera frames


def open_capture(source: int | str) -> cv2.VideoCapture:
    """A cv2.VideoCapture for a camera index, a video file, a stream URL or a GStreamer pipeline
    (tests replace this)."""
    if isinstance(source, str) and is_stream_url(source):
        timeouts = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, STREAM_TIMEOUT_MS, cv2.CAP_PROP_READ_TIMEOUT_MSEC]
        return cv2.VideoCapture(source, cv2.CAP_FFMPEG, [*timeouts, STREAM_TIMEOUT_MS])
    if isinstance(source, str) and is_pipeline(source) and not Path(source).exists():
        return cv2.VideoCapture(source, cv2.CAP_GSTREAMER)
    return cv2.VideoCapture(source)


def iter_source(
    source: str,
    retries: int = RunOptions.camera_retries,
    retry_delay_s: float = RunOptions.retry_delay_s,
    warn: Callable[[str], None] | None = None,
) -> Iterator[SourceFrame]:
    """Frames of a folder (images, recursively, sorted), an image file, a video file, camera:N, a stream
    URL (rtsp://, http://, ...) or a GStreamer pipeline ending in appsink. Live sources that stop are
    reopened up to ``retries`` times, ``retry_delay_s`` apart; ``warn`` hears about each reconnection."""
    text = source.strip()
    match = CAMERA.fullmatch(text)
    if match:
        camera = int(match.group(1))
        yield from _live_frames(camera, f"camera {camera}", f"camera:{camera}", retries, retry_delay_s, warn)
        return
    path = Path(source)
    if is_stream_url(text) or (is_pipeline(text) and not path.exists()):
        why = unsupported(text)
        if why is not None:
            raise SourceError(f"cannot read {redact(text)}: {why}")
        name = redact(text) if is_stream_url(text) else "gstreamer"
        label = f"stream {name}" if is_stream_url(text) else "the GStreamer pipeline"
        yield from _live_frames(text, label, name, retries, retry_delay_s, warn)
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise SourceError(f"{path} holds no image file ({', '.join(sorted(IMAGE_SUFFIXES))})")
        for index, file in enumerate(files):
            yield _read_file(index, file)
    elif path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES:
        yield from _video_frames(path)
    elif path.is_file():
        yield _read_file(0, path)
    else:
        raise SourceError(
            f"source {source!r} is not a folder, an image file, a video file, camera:N, a stream URL "
            "(rtsp://, http://, ...) or a GStreamer pipeline (... ! appsink)"
        )


def iter_followed(source: str) -> Iterator[SourceFrame | None]:
    """``run --follow``: the image files of folder ``source`` as they are completely written (folder_follow.py),
    forever; None while the folder is quiet."""
    folder = Path(source)
    if not folder.is_dir():
        raise SourceError(f"--follow takes a folder that frames are written to; {source!r} is not a folder")
    index = 0
    for path in follow_folder(folder, IMAGE_SUFFIXES):
        if path is None:
            yield None
            continue
        yield _read_file(index, path)
        index += 1


def _read_file(index: int, path: Path) -> SourceFrame:
    started = time.perf_counter()
    try:
        frame = read_image_bgr(path)
        return SourceFrame(index, str(path), frame, read_ms=(time.perf_counter() - started) * 1e3, stem=path.stem)
    except FrameError as exc:
        return SourceFrame(index, str(path), None, error=str(exc), stem=path.stem)


def _video_frames(path: Path) -> Iterator[SourceFrame]:
    capture = open_capture(str(path))
    if not capture.isOpened():
        raise SourceError(f"cannot open video file {path} (corrupt, or a codec OpenCV lacks)")
    try:
        index = 0
        while True:
            started = time.perf_counter()
            ok, frame = capture.read()
            if not ok:
                return  # end of the file
            yield SourceFrame(index, f"{path}#{index}", frame, read_ms=(time.perf_counter() - started) * 1e3)
            index += 1
    finally:
        capture.release()


def _live_frames(
    source: int | str, label: str, name: str, retries: int, delay_s: float, warn: Callable[[str], None] | None
) -> Iterator[SourceFrame]:
    """A camera, stream or pipeline: a failed read reopens the source (a camera that dropped off the
    bus, an IP camera that rebooted, a network hiccup), up to ``retries`` times in a row."""
    capture = open_capture(source)
    if not capture.isOpened():
        hint = "check the cable and that no other program holds it" if isinstance(source, int) else (
            "check the address, the network and that the camera is streaming")  # fmt: skip
        raise SourceError(f"cannot open {label}: {hint}")
    index, failures = 0, 0
    try:
        while True:
            started = time.perf_counter()
            ok, frame = capture.read()
            if ok and frame is not None:
                failures = 0
                yield SourceFrame(index, f"{name}#{index}", frame, read_ms=(time.perf_counter() - started) * 1e3)
                index += 1
                continue
            failures += 1
            if failures > retries:
                raise CameraLost(
                    f"{label} stopped delivering frames after frame {index}: "
                    f"reopened it {retries} times over {retries * delay_s:.1f} s without a frame"
                )
            if warn is not None:
                warn(f"{label} delivered no frame after frame {index}; reopening it ({failures}/{retries})")
            time.sleep(delay_s)
            capture.release()
            capture = open_capture(source)
    finally:
        capture.release()


# --- the loop ------------------------------------------------------------------------------------
@dataclass
class LoopStats:
    """Counts and latencies over a run, for the summary; fixed memory however long the run."""

    frames: int = 0
    errors: int = 0
    unknown: int = 0
    per_task: dict[str, dict[str, int]] = field(default_factory=dict)
    latencies: dict[str, LatencyReservoir] = field(
        default_factory=lambda: {s: LatencyReservoir() for s in (*STAGES, "total")}
    )
    started: float = field(default_factory=time.perf_counter)
    interrupted: bool = False

    def add(self, result: FrameResult) -> None:
        self.frames += 1
        if result.error is not None:
            self.errors += 1
            return
        if result.task == UNKNOWN:
            self.unknown += 1
        else:
            counts = self.per_task.setdefault(result.task, {"frames": 0, "anomalies": 0})  # type: ignore[arg-type]
            counts["frames"] += 1
            counts["anomalies"] += int(bool(result.is_anomaly))
        for stage in STAGES:
            self.latencies[stage].add(getattr(result.timings, stage))
        self.latencies["total"].add(result.timings.total)

    def add_error(self) -> None:
        self.frames += 1
        self.errors += 1

    def summary(self, runtime: Runtime | None, exit_code: int) -> dict[str, object]:
        wall = time.perf_counter() - self.started
        processed = self.frames - self.errors
        return {
            "frames": self.frames,
            "processed": processed,
            "errors": self.errors,
            "unknown": self.unknown,
            "anomalies": sum(c["anomalies"] for c in self.per_task.values()),
            "tasks": self.per_task,
            "latency_ms": {stage: v.percentiles() for stage, v in self.latencies.items()},
            "wall_s": round(wall, 3),
            "frames_per_s": round(processed / wall, 2) if wall > 0 else None,
            "backend": None if runtime is None else runtime.description,
            "precision": None if runtime is None else runtime.precision.value,
            "latency_target": None if runtime is None or runtime.engine_choice is None else runtime.engine_choice.as_dict(),
            "engines": None if runtime is None else runtime.engine_stats.as_dict(),
            "calibration": None if runtime is None else runtime.task_status(),
            "failed_tasks": None if runtime is None else runtime.load_failures,
            "interrupted": self.interrupted,
            "exit_code": exit_code,
        }


def _human_summary(summary: dict) -> str:
    lines = [
        f"moleflow-edge run: {summary['frames']} frames ({summary['processed']} processed, {summary['errors']} errors, "
        f"{summary['unknown']} unknown product) in {summary['wall_s']} s, {summary['frames_per_s']} frames/s"
        + (f" on {summary['backend']}" if summary["backend"] else "")
    ]
    for task, counts in sorted(summary["tasks"].items()):
        lines.append(f"  {task}: {counts['frames']} frames, {counts['anomalies']} anomalous")
    total = summary["latency_ms"]["total"]
    if total:
        stages = ", ".join(
            f"{s} {summary['latency_ms'][s]['p50']:.2f}" for s in STAGES if summary["latency_ms"][s] is not None
        )
        lines.append(f"  latency ms: p50 {total['p50']:.2f}  p90 {total['p90']:.2f}  p99 {total['p99']:.2f}")
        lines.append(f"  p50 per stage (ms): {stages}")
    if summary["interrupted"]:
        lines.append("  interrupted (Ctrl-C)")
    return "\n".join(lines)


def run_source(
    source: str,
    options: RunOptions,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
    runtime: Runtime | None = None,
) -> int:
    """Run every frame of ``source`` (folder, image, video, camera:N, stream URL, GStreamer pipeline)
    through ``options.export_dir`` as ``options`` say (runtime/options.py) and return the exit code.

    One JSON line per frame to ``out`` (stdout), overlays to ``save_dir`` when given, a cv2
    window with ``show``; a final {"summary": ...} line, also written for people to ``err``.
    Exit codes: 0 done, 1 export not loadable, 2 source not readable, 3 camera, stream or server lost,
    4 backend failed mid-run, 5 every frame failed, 130 Ctrl-C (after the summary). Frames that fail
    alone are error lines. ``runtime`` reuses a loaded Runtime, or a serving.RemoteRuntime (Triton)
    that stands in for one (then ``options.runtime`` is unused). A latency target picks the
    precision and target (Runtime.load) and says which, and why, on ``err``.
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    export_dir, save_dir = options.export_dir, options.save_dir
    if save_dir is not None:
        check_writable(save_dir, "--save", directory=True)
    stats = LoopStats()
    code = EXIT_OK
    owned = runtime is None
    try:
        if runtime is None:
            with warnings.catch_warnings():  # a missed target is said once, below, as a warning line
                warnings.simplefilter("ignore", LatencyTargetWarning)
                runtime = Runtime.load(export_dir, options.runtime)
    except (ManifestError, BackendError, ValueError, OSError) as exc:
        print(f"error: cannot load the export {export_dir}: {exc}", file=err)
        summary = stats.summary(None, EXIT_LOAD_ERROR)
        print(json.dumps({"summary": summary}), file=out, flush=True)
        return EXIT_LOAD_ERROR

    choice = runtime.engine_choice
    if choice is not None:
        print(("" if choice.met else "warning: ") + choice.summary(), file=err)
    for task, status in runtime.task_status().items():
        print(f"task {task}: {status}", file=err)
    if runtime.uncalibrated:
        print(
            f"warning: {', '.join(runtime.uncalibrated)} not calibrated at {runtime.precision.value}: frames get a "
            "score but no decision (is_anomaly null); run moleflow-edge calibrate --export DIR --data ROOT "
            f"--precision {runtime.precision.value}",
            file=err,
        )
    if options.check:
        try:
            runtime.check_graphs()
        except BackendError as exc:
            print(f"error: --check: {exc}", file=err)
            print(json.dumps({"summary": stats.summary(runtime, EXIT_BACKEND_ERROR)}), file=out, flush=True)
            if owned:
                runtime.close()
            return EXIT_BACKEND_ERROR

    save = Path(save_dir) if save_dir is not None else None
    if save is not None:
        save.mkdir(parents=True, exist_ok=True)
    viewer = Viewer(err) if options.show else None

    def emit(line: dict) -> None:
        out.write(json.dumps(line) + "\n")
        out.flush()

    def process(batch: list[SourceFrame]) -> bool:
        """Run a batch (on a newly committed export, when one came); False when the viewer asked to stop."""
        nonlocal runtime
        keep_going = True
        if live is not None:
            runtime = live.current()
        results = runtime.infer([item.frame for item in batch])  # type: ignore[union-attr]
        if live is not None:
            live.record([item.index for item in batch])
        for item, result in zip(batch, results):
            stats.add(result)
            line: dict[str, object] = {"frame": item.index, "source": item.name}
            if result.error is not None:
                emit({**line, "error": result.error})
                continue
            fields = result.summary()
            fields.pop("index")
            line |= fields
            line["read_ms"] = round(item.read_ms, 3)
            if save is not None or viewer is not None:
                cap = runtime.max_map_side  # type: ignore[union-attr]
                overlay = render_overlay(item.frame, result, max_side=cap)  # type: ignore[arg-type]
                if save is not None:
                    target = save / f"{item.index:06d}_{_safe(item.stem)}.png"
                    try:
                        write_png(target, overlay)
                        line["overlay"] = str(target)
                    except OSError as exc:  # a full disk costs the overlay, not the inspection
                        line["overlay_error"] = str(exc)
                if viewer is not None:
                    keep_going = viewer.show(overlay) and keep_going
            emit(line)
        return keep_going

    pending: list[SourceFrame] = []
    warn = lambda m: print(f"warning: {m}", file=err)  # noqa: E731
    live = LiveExport(runtime, warn) if owned else None  # a newly committed export is picked up between batches
    try:
        frames = iter_followed(source) if options.follow else iter_source(
            source, options.camera_retries, options.retry_delay_s, warn)  # fmt: skip
        for item in frames:
            if item is None:  # a followed folder is quiet: score what waits, or look for a new export
                if pending:
                    batch, pending = pending, []
                    if not process(batch):
                        break
                elif live is not None:
                    runtime = live.current()
                continue
            if options.max_frames is not None and stats.frames + len(pending) >= options.max_frames:
                break
            if item.error is not None:
                stats.add_error()
                emit({"frame": item.index, "source": item.name, "error": item.error})
                continue
            pending.append(item)
            last = options.max_frames is not None and stats.frames + len(pending) >= options.max_frames
            if len(pending) >= options.batch_size or last:
                batch, pending = pending, []
                if not process(batch) or last:
                    break
        if pending:
            batch, pending = pending, []
            process(batch)
    except ServerLost as exc:  # the frames of the batch in flight got no answer
        print(f"error: {exc}", file=err)
        code = EXIT_CAMERA_LOST
    except SourceError as exc:  # CameraLost included: frames read before it are still reported
        print(f"error: {exc}", file=err)
        code = EXIT_CAMERA_LOST if isinstance(exc, CameraLost) else EXIT_SOURCE_ERROR
        if pending:
            process(pending)
    except BackendError as exc:
        print(f"error: inference failed: {exc}", file=err)
        code = EXIT_BACKEND_ERROR
    except KeyboardInterrupt:
        stats.interrupted = True
        code = EXIT_INTERRUPTED
    finally:
        if viewer is not None:
            viewer.close()

    if runtime.load_failures and code == EXIT_OK:  # some frames ran, but a listed graph is broken
        print(f"error: detector graphs failed: {runtime.load_failures}", file=err)
        code = EXIT_BACKEND_ERROR
    if code == EXIT_OK and stats.frames and stats.errors == stats.frames:
        print(f"error: every frame failed ({stats.errors} of {stats.frames}); see the error lines", file=err)
        code = EXIT_ALL_FRAMES_FAILED
    summary = stats.summary(runtime, code)
    if live is not None:
        summary |= live.summary()
    emit({"summary": summary})
    print(_human_summary(summary), file=err)
    if live is not None:
        live.close()
    return code


def _safe(stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem) or "frame"
