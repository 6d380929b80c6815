"""run --source with live sources: an MJPEG stream served over HTTP on localhost (dropped, stalled,
refused), GStreamer pipelines (refused clearly where OpenCV lacks GStreamer), and the parsing behind them."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest

from moleflow_edge.runtime import RunOptions, RunOutcome, Runtime, RuntimeOptions, run_source, sources
from moleflow_edge.runtime.video_io import has_backend, is_pipeline, is_stream_url, redact, unsupported, video_io
from tests.export_fixture import TASKS

BUILD_WITH_GSTREAMER = """
  Video I/O:
    DC1394:                      NO
    FFMPEG:                      NO
    GStreamer:                   YES (1.20.3)
    v4l/v4l2:                    YES (linux/videodev2.h)
"""


@pytest.fixture(scope="module")
def jpegs(built: dict) -> list[tuple[str, bytes]]:
    """(true task, JPEG bytes) for normal test images of every exported task, alternating tasks."""
    per_task = [sorted((Path(built["data"]) / t / "test" / "good").glob("*.png"))[:4] for t in TASKS]
    out = []
    for row in zip(*per_task, strict=True):
        for task, path in zip(TASKS, row, strict=True):
            ok, data = cv2.imencode(".jpg", cv2.imread(str(path)), [cv2.IMWRITE_JPEG_QUALITY, 95])
            assert ok
            out.append((task, data.tobytes()))
    return out


class MjpegServer:
    """An IP camera on 127.0.0.1: connection k sends plan[k] frames as multipart/x-mixed-replace, then
    drops (or, with ``stall_s``, holds the connection silent first); connections beyond the plan get 503."""

    def __init__(self, jpegs: list[bytes], plan: list[int], stall_s: float = 0.0) -> None:
        self.connections = 0
        frames = iter(jpegs * 10)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                k, server.connections = server.connections, server.connections + 1
                if k >= len(plan):
                    self.send_error(503, "camera offline")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                for _ in range(plan[k]):
                    data = next(frames)
                    self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(data))
                    self.wfile.write(data + b"\r\n")
                    self.wfile.flush()
                time.sleep(stall_s)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, credentials: str = "") -> str:
        return f"http://{credentials}127.0.0.1:{self.httpd.server_address[1]}/line1.mjpg"

    def __enter__(self) -> MjpegServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture(scope="module")
def runtime(built: dict) -> Iterator[Runtime]:
    rt = Runtime.load(built["export_dir"], RuntimeOptions("onnxruntime-cpu"))
    yield rt
    rt.close()


def test_stream_that_drops_is_reconnected_then_reported_lost(runtime: Runtime, jpegs: list, tmp_path: Path) -> None:
    # ffmpeg probes the first frames before it opens a stream, so each connection sends more than a few
    plan = [24, 16]
    with MjpegServer([data for _, data in jpegs], plan) as server:
        out, err = io.StringIO(), io.StringIO()
        options = RunOptions("unused", camera_retries=2, retry_delay_s=0.05, batch_size=4)
        code = run_source(server.url("operator:s3cret@"), options, out=out, err=err, runtime=runtime)
    lines = _lines(out.getvalue())
    frames, summary = lines[:-1], lines[-1]["summary"]
    assert code is RunOutcome.LOST and summary["outcome"] == "lost"
    assert summary["processed"] == sum(plan) and [f["frame"] for f in frames] == list(range(sum(plan)))
    assert server.connections == 1 + 1 + 2  # first open, one reconnection that worked, two that got 503
    assert "reopening it (1/2)" in err.getvalue() and "stopped delivering frames after frame 40" in err.getvalue()
    assert "s3cret" not in out.getvalue() + err.getvalue() and "operator:***@" in frames[0]["source"]
    # every frame is routed to the product it shows and scored as the runtime scores the same JPEG
    # decoded by the same decoder (FFmpeg's differs from libjpeg's by a few grey levels per pixel)
    expected = [task for task, _ in jpegs] * 10
    assert [f["task"] for f in frames] == expected[: sum(plan)]
    direct = runtime.infer([_ffmpeg_decode(data, tmp_path) for _, data in jpegs])
    for line, reference in zip(frames[: len(direct)], direct, strict=True):  # the first cycle
        assert line["score"] == pytest.approx(reference.image_score, rel=1e-4)


def _ffmpeg_decode(jpeg: bytes, folder: Path) -> np.ndarray:
    """The JPEG as FFmpeg (the stream's decoder) decodes it, read from a file."""
    path = folder / "frame.jpg"
    path.write_bytes(jpeg)
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    ok, frame = capture.read()
    capture.release()
    assert ok, f"FFmpeg could not decode {path}"
    return frame


def test_stalled_stream_times_out_instead_of_hanging(
    runtime: Runtime, jpegs: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sources, "STREAM_TIMEOUT_MS", 400)
    with MjpegServer([data for _, data in jpegs], [24], stall_s=20.0) as server:
        out, err = io.StringIO(), io.StringIO()
        started = time.perf_counter()
        options = RunOptions("unused", camera_retries=1, retry_delay_s=0.05)
        code = run_source(server.url(), options, out=out, err=err, runtime=runtime)
        elapsed = time.perf_counter() - started
    assert code is RunOutcome.LOST and _lines(out.getvalue())[-1]["summary"]["processed"] == 24
    assert elapsed < 10.0, f"a silent stream held the loop for {elapsed:.1f} s"


def test_stream_that_never_answers_is_a_source_error(runtime: Runtime) -> None:
    with MjpegServer([], []) as server:
        err = io.StringIO()
        code = run_source(server.url(), RunOptions("unused"), out=io.StringIO(), err=err, runtime=runtime)
    assert code is RunOutcome.SOURCE_UNREADABLE and "cannot open stream http://127.0.0.1" in err.getvalue()


def test_gstreamer_pipeline_runs_or_is_refused_naming_gstreamer(runtime: Runtime) -> None:
    pipeline = "videotestsrc num-buffers=30 ! video/x-raw,width=160,height=120 ! videoconvert ! appsink"
    out, err = io.StringIO(), io.StringIO()
    options = RunOptions("unused", camera_retries=0, retry_delay_s=0)
    code = run_source(pipeline, options, out=out, err=err, runtime=runtime)
    summary = _lines(out.getvalue())[-1]["summary"]
    if has_backend("GStreamer"):  # an OpenCV built with GStreamer (JetPack's, a distribution's) reads it
        assert summary["processed"] == 30 and code is RunOutcome.LOST
    else:  # the PyPI wheels: refused before opening, naming what is missing
        assert code is RunOutcome.SOURCE_UNREADABLE and summary["frames"] == 0
        assert "no GStreamer support" in err.getvalue() and "Jetson" in err.getvalue()


def test_pipeline_without_appsink_is_refused() -> None:
    with pytest.raises(sources.SourceError, match="must end in appsink"):
        next(sources.iter_source("nvarguscamerasrc ! nvvidconv ! autovideosink"))


def test_source_strings_are_classified() -> None:
    assert is_stream_url("rtsp://10.0.0.5:554/stream1") and is_stream_url("HTTP://cam/mjpg")
    assert not is_stream_url("camera:0") and not is_stream_url("/data/line1.mp4")
    assert is_pipeline("nvarguscamerasrc ! video/x-raw(memory:NVMM) ! nvvidconv ! appsink drop=1")
    assert not is_pipeline("rtsp://cam/a!b")
    assert redact("rtsp://admin:hunter2@10.0.0.5/live") == "rtsp://admin:***@10.0.0.5/live"
    assert redact("rtsp://10.0.0.5/live") == "rtsp://10.0.0.5/live"


def test_build_information_decides_what_can_be_read() -> None:
    assert video_io(BUILD_WITH_GSTREAMER)["GStreamer"] == "YES (1.20.3)"
    pipeline = "v4l2src ! videoconvert ! appsink"
    assert unsupported(pipeline, BUILD_WITH_GSTREAMER) is None
    assert "FFmpeg" in unsupported("rtsp://cam/live", BUILD_WITH_GSTREAMER)
    assert "GStreamer" in unsupported(pipeline, BUILD_WITH_GSTREAMER.replace("YES (1.20.3)", "NO"))
    # this machine's own build, as doctor reports it
    assert set(video_io()) >= {"FFMPEG", "GStreamer"}
