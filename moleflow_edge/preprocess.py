"""Frame checks, resizing and image reading shared by training and the runtime.

This module imports only numpy and OpenCV so that the torch-free runtime uses
exactly the same resize as training and evaluation: a model exported from
training then sees the same pixels on the line PC as it saw when it was fit.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from moleflow_edge.errors import UserError

__all__ = ["FrameError", "check_frame", "resize_frame", "read_image_bgr"]


class FrameError(UserError):
    """A frame that cannot be processed; the message names what is wrong."""


def frame_list(frames: object) -> list[object]:
    """One frame, a list/tuple of frames, or a (B,H,W,3) array -> list of frames: what ``infer``
    takes, locally or from a server."""
    if isinstance(frames, np.ndarray) and frames.ndim == 4:
        return list(frames)
    if isinstance(frames, (list, tuple)):
        return list(frames)
    return [frames]


def check_frame(frame: object) -> np.ndarray:
    """Return ``frame`` if it is a uint8 BGR ``(H, W, 3)`` array, else raise FrameError.

    The runtime calls this per frame so that one bad camera frame yields a
    clear error for that frame instead of a cryptic failure deep in a model.
    """
    expected = "expected uint8 BGR HxWx3"
    if not isinstance(frame, np.ndarray):
        raise FrameError(f"frame is a {type(frame).__name__}, not a numpy array; {expected}")
    if frame.dtype != np.uint8:
        raise FrameError(f"frame has dtype {frame.dtype}, {expected}")
    if frame.ndim != 3:
        raise FrameError(f"frame has {frame.ndim} dimensions (shape {frame.shape}), {expected}")
    height, width, channels = frame.shape
    if height == 0 or width == 0:
        raise FrameError(f"frame is empty (shape {frame.shape}), {expected}")
    if channels != 3:
        raise FrameError(f"frame has {channels} channels (shape {frame.shape}), {expected}")
    return frame


def resize_frame(frame_bgr: np.ndarray, size: int) -> np.ndarray:
    """Resize a BGR frame to ``(size, size, 3)`` uint8, contiguous.

    The one place the toolkit resizes images, so training, eval and runtime
    agree: INTER_AREA when both sides shrink (it anti-aliases), else
    INTER_LINEAR.
    """
    frame = check_frame(frame_bgr)
    if size <= 0:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    height, width = frame.shape[:2]
    if height == size and width == size:
        return np.ascontiguousarray(frame)
    shrinking = height > size and width > size
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    resized = cv2.resize(frame, (size, size), interpolation=interpolation)
    return np.ascontiguousarray(resized)


def read_image_bgr(path: str | Path) -> np.ndarray:
    """Read an image file as uint8 BGR ``(H, W, 3)``.

    Uses ``cv2.IMREAD_COLOR`` semantics (grayscale becomes 3 channels, alpha is
    dropped, 16-bit is scaled to 8-bit) and reads the bytes with numpy so that
    non-ASCII paths work on every platform. Raises FrameError naming the file
    when it is missing or not a decodable image.
    """
    path = Path(path)
    if not path.is_file():
        raise FrameError(f"image file {path} does not exist or is not a file")
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise FrameError(f"cannot read image file {path}: {exc}") from exc
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise FrameError(f"cannot decode image file {path}: not a readable image (corrupt or unsupported format)")
    return check_frame(image)
