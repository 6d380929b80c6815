"""Variants of training images: what a line's lighting and its camera's compression do to a good part.

A lamp ageing, a shutter drifting or a reflection changes gain, contrast and gamma, not the
part. Training on such variants teaches each task's detector that these changes are normal, so they do not
raise the anomaly score. An MJPEG camera's compression changes the blocks and the colour
resolution, not the part: the router learns JPEG round trips of the training images as normal,
so a compressed good frame is not taken for an unknown product.
"""

from __future__ import annotations

import cv2
import numpy as np


def photometric_variants(images: np.ndarray, copies: int, strength: float, seed: int) -> np.ndarray:
    """(N,S,S,3) uint8 -> (copies,N,S,S,3) uint8, each with its own gain, contrast and gamma in [1-s, 1+s]."""
    rng = np.random.default_rng(seed)
    x = images.astype(np.float32) / 255.0
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    out = np.empty((copies, *images.shape), dtype=np.uint8)
    for c in range(copies):
        gain, contrast, gamma = (rng.uniform(1 - strength, 1 + strength, (3, len(images), 1, 1, 1))).astype(np.float32)
        varied = ((x**gamma - mean**gamma) * contrast + mean**gamma) * gain
        out[c] = np.clip(np.rint(varied * 255.0), 0, 255).astype(np.uint8)
    return out


CAMERA_JPEG_QUALITIES = (95, 85, 75, 60)  # what MJPEG cameras are set to, from near-lossless to coarse


def jpeg_round_trips(images: np.ndarray, qualities: tuple[int, ...] = CAMERA_JPEG_QUALITIES) -> np.ndarray:
    """(N,S,S,3) uint8 BGR -> (Q,N,S,S,3): each image encoded as JPEG at each quality and decoded, as an
    MJPEG camera delivers it. Blocking and chroma subsampling move a frame's pooled routing feature
    along directions where a product's good images barely vary."""
    out = np.empty((len(qualities), *images.shape), dtype=np.uint8)
    for q, quality in enumerate(qualities):
        for i, image in enumerate(images):
            _, encoded = cv2.imencode(".jpg", np.ascontiguousarray(image), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
            out[q, i] = cv2.imdecode(encoded, cv2.IMREAD_COLOR)
    return out
