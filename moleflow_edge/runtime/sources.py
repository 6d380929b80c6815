"""Frame sources of `moleflow-edge run` (and of learn's and calibrate's ``--source``): a folder, an image,
a video, a camera, a stream URL or a GStreamer pipeline, read as SourceFrames one at a time.

A frame that cannot be read is a SourceFrame with ``error`` (the run goes on); a source that cannot be
opened at all is a SourceError; a camera or stream that stops delivering frames is reopened a bounded
number of times, then CameraLost.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from moleflow_edge.errors import LinkError
from moleflow_edge.preprocess import FrameError, read_image_bgr
from moleflow_edge.runtime.folder_follow import follow_folder
from moleflow_edge.runtime.options import RunOptions
from moleflow_edge.runtime.video_io import is_pipeline, is_stream_url, redact, unsupported

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pbm", ".pgm", ".ppm", ".jp2"})
VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".m4v", ".mpg", ".mpeg", ".wmv", ".webm"})
CAMERA = re.compile(r"camera:(\d+)")
# a stalled stream (connected, no frames) must not block a read forever: OpenCV's FFmpeg timeouts
STREAM_TIMEOUT_MS = 5000


class SourceError(LinkError):
    """The source cannot be opened or read at all."""


class CameraLost(SourceError):
    """A camera or stream stopped delivering frames and reopening it did not help."""


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
