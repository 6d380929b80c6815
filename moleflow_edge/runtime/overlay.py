"""Overlays for ``moleflow-edge run``: the anomaly map blended into the frame, to a PNG or a window."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TextIO

import cv2
import numpy as np

from moleflow_edge.anomaly_map import capped_shape
from moleflow_edge.router import UNKNOWN
from moleflow_edge.runtime.result import FrameResult

WINDOW = "moleflow-edge"


def render_overlay(
    frame: np.ndarray, result: FrameResult, alpha: float = 0.45, max_side: int | None = None
) -> np.ndarray:
    """The frame with its anomaly heat map blended in and task, score and decision written on it.

    The colour scale runs from the map's minimum to max(map maximum, threshold), so that a
    normal frame of a calibrated task stays cool and a defect turns hot. ``max_side`` caps the
    overlay's longest side (the frame is shrunk first), so a huge frame costs no huge buffers.
    """
    height, width = capped_shape(frame.shape[:2], max_side)
    if (height, width) != frame.shape[:2]:
        image = cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA)
    else:
        image = frame.copy()
    if result.anomaly_map is not None:
        heat = result.anomaly_map
        low = float(heat.min())
        high = max(float(heat.max()), result.threshold if result.threshold is not None else -np.inf)
        scaled = np.clip((heat - low) / max(high - low, 1e-6) * 255.0, 0, 255).astype(np.uint8)
        colour = cv2.applyColorMap(scaled, cv2.COLORMAP_JET)
        if colour.shape[:2] != image.shape[:2]:  # the runtime caps a huge frame's map (max_map_side)
            colour = cv2.resize(colour, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
        image = cv2.addWeighted(colour, alpha, image, 1.0 - alpha, 0.0)
    if result.error is not None:
        text, colour_bgr = "error", (0, 0, 255)
    elif result.task == UNKNOWN:
        seen = f" (map: nearest {result.explained_by})" if result.explained_by else ""
        text, colour_bgr = f"unknown product{seen}", (0, 200, 255)
    else:
        verdict = {True: "ANOMALY", False: "ok", None: "uncalibrated"}[result.is_anomaly]
        text = f"{result.task}  score {result.image_score:.2f}  {verdict}"
        colour_bgr = (0, 0, 255) if result.is_anomaly else (0, 255, 0)
    scale = max(0.4, min(image.shape[:2]) / 500.0)
    origin = (8, int(24 * scale) + 6)
    cv2.putText(image, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(image, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, colour_bgr, 1, cv2.LINE_AA)
    return image


def write_png(path: Path, image: np.ndarray) -> None:
    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"cannot encode overlay {path}")
    data.tofile(str(path))  # numpy writes the bytes: non-ASCII paths work everywhere


class Viewer:
    """A cv2 window, switched off with one warning where there is no display or no GUI build."""

    def __init__(self, err: TextIO) -> None:
        self.err = err
        self.enabled = True
        self.used = False
        if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
            self._disable("no display (DISPLAY is not set)")

    def _disable(self, why: str) -> None:
        if self.enabled:
            print(f"warning: --show ignored: {why}", file=self.err)
        self.enabled = False

    def show(self, image: np.ndarray) -> bool:
        """Show a frame; False when the user pressed q or Esc."""
        if not self.enabled:
            return True
        try:
            cv2.imshow(WINDOW, image)
            self.used = True
            return (cv2.waitKey(1) & 0xFF) not in (ord("q"), 27)
        except cv2.error as exc:  # opencv-python-headless has no window support
            self._disable(f"OpenCV cannot open a window ({str(exc).strip().splitlines()[-1]})")
            return True

    def close(self) -> None:
        if self.used:
            try:
                cv2.destroyAllWindows()
            except cv2.error:
                pass
