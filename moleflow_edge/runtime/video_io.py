"""What a ``--source`` string is, and what the installed OpenCV build can read.

Line cameras are read three ways besides folders and files: ``camera:N`` (a V4L2/USB device),
a stream URL (RTSP from IP cameras, HTTP MJPEG, read through OpenCV's FFmpeg backend) and a
GStreamer pipeline (CSI cameras on a Jetson through nvarguscamerasrc, hardware decoding),
which needs an OpenCV built with GStreamer: the PyPI wheels never are, JetPack's OpenCV is.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https", "udp", "tcp", "srt")
_URL = re.compile(rf"(?:{'|'.join(STREAM_SCHEMES)})://\S+", re.IGNORECASE)
_BUILD_LINE = re.compile(r"^\s*(FFMPEG|GStreamer|v4l/v4l2|GTK\+?|QT|Win32 UI|Cocoa):\s*(.+?)\s*$", re.MULTILINE)


def is_stream_url(source: str) -> bool:
    return _URL.fullmatch(source.strip()) is not None


def is_pipeline(source: str) -> bool:
    """gst-launch syntax: elements joined by '!' (iter_source asks only after ruling out paths and URLs)."""
    return "!" in source and not is_stream_url(source)


def redact(url: str) -> str:
    """The URL without its password, for logs and JSON lines (rtsp://user:secret@host -> rtsp://user:***@host)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def video_io(build_information: str | None = None) -> dict[str, str]:
    """Video I/O and GUI backends of the OpenCV build, from cv2.getBuildInformation():
    {"FFMPEG": "YES", "GStreamer": "NO", "v4l/v4l2": "YES (linux/videodev2.h)", ...}."""
    if build_information is None:
        import cv2

        build_information = cv2.getBuildInformation()
    return {name: value for name, value in _BUILD_LINE.findall(build_information)}


def has_backend(name: str, build_information: str | None = None) -> bool:
    """True when the build lists ``name`` (FFMPEG, GStreamer, ...) as YES."""
    return video_io(build_information).get(name, "NO").upper().startswith("YES")


def unsupported(source: str, build_information: str | None = None) -> str | None:
    """Why this OpenCV build cannot open a stream URL or pipeline ``source``; None when it can."""
    if is_pipeline(source):
        if not source.rsplit("!", 1)[-1].strip().startswith("appsink"):
            return "a GStreamer pipeline for OpenCV must end in appsink (... ! videoconvert ! appsink)"
        if not has_backend("GStreamer", build_information):
            return (
                "this OpenCV build has no GStreamer support (cv2.getBuildInformation() says GStreamer: NO; "
                "the opencv-python wheels from PyPI never have it). On a Jetson use JetPack's OpenCV "
                "(README, Jetson); elsewhere read the camera's RTSP URL instead, or build OpenCV with GStreamer"
            )
    elif is_stream_url(source) and not has_backend("FFMPEG", build_information):
        return (
            "this OpenCV build has no FFmpeg support (cv2.getBuildInformation() says FFMPEG: NO), which stream "
            "URLs need: pip install 'moleflow-edge[cpu]' brings opencv-python-headless, which has it"
        )
    return None
