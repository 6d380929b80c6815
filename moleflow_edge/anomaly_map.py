"""Patch-score grid -> anomaly map at image resolution. Torch-free: eval and runtime share it."""

from __future__ import annotations

import math

import cv2
import numpy as np


def anomaly_map(
    patch_scores: np.ndarray, image_size: int, sigma: float, out_hw: tuple[int, int] | None = None
) -> np.ndarray:
    """(H,W) patch scores -> (image_size, image_size) map, bilinear then Gaussian (sigma px).

    ``out_hw`` resizes the smoothed map once more to a frame's own (height, width), so that a
    map lines up with the camera frame it came from.
    """
    grid = np.ascontiguousarray(patch_scores, dtype=np.float32)
    up = cv2.resize(grid, (image_size, image_size), interpolation=cv2.INTER_LINEAR)
    ksize = 2 * math.ceil(4 * sigma) + 1
    smooth = cv2.GaussianBlur(up, (ksize, ksize), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)
    if out_hw is not None and out_hw != (image_size, image_size):
        smooth = cv2.resize(smooth, (out_hw[1], out_hw[0]), interpolation=cv2.INTER_LINEAR)
    return smooth


def capped_shape(hw: tuple[int, ...], max_side: int | None) -> tuple[int, int]:
    """(height, width) scaled down, aspect kept, so that the longer side is at most ``max_side``:
    one huge frame must not cost gigabytes of map. None keeps the size."""
    height, width = int(hw[0]), int(hw[1])
    if max_side is None or max(height, width) <= max_side:
        return height, width
    scale = max_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))
