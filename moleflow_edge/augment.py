"""Photometric variants of training images: what a line's lighting does to a good part.

A lamp ageing, a shutter drifting or a reflection changes gain, contrast and gamma, not the
part. Training on such variants teaches the flow that these changes are normal, so they do not
raise the anomaly score.
"""

from __future__ import annotations

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
