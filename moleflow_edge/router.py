"""Mahalanobis prototype router: which product is in the frame, or none of them.

Torch-free (numpy only): training fits prototypes with it, and the runtime computes the
same distances, so both sides route identically.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moleflow_edge.config import Covariance

UNKNOWN = "unknown"
LIMIT_FOLDS = 5


@dataclass(frozen=True)
class Prototype:
    """One task's routing prototype: mean (C,), whitener W (C,C) with precision P = W^T W, distance limit."""

    mean: np.ndarray
    whitener: np.ndarray
    limit: float


def ledoit_wolf(centered: np.ndarray) -> np.ndarray:
    """Ledoit-Wolf shrinkage covariance of centred samples (N,C) towards a scaled identity.

    With 50-200 images and 100-2000 channels the sample covariance is singular; shrinkage keeps
    the distances meaningful where the papers' tiny ridge does not.
    """
    n, c = centered.shape
    sample = centered.T @ centered / n
    mu = np.trace(sample) / c
    target = mu * np.eye(c)
    delta = np.sum((sample - target) ** 2) / c
    squares = centered**2
    beta = (np.sum(squares.T @ squares) / n - np.sum(sample**2)) / (c * n)
    shrink = 0.0 if delta == 0 else min(max(beta / delta, 0.0), 1.0)
    return shrink * target + (1.0 - shrink) * sample


def _mean_and_whitener(features: np.ndarray, covariance: str, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    mean = features.mean(axis=0)
    centered = features - mean
    if Covariance(covariance) is Covariance.LEDOIT_WOLF:
        cov = ledoit_wolf(centered)
    else:
        cov = centered.T @ centered / max(len(features) - 1, 1) + ridge * np.eye(features.shape[1])
    precision = np.linalg.inv(cov)
    precision = 0.5 * (precision + precision.T)
    return mean, np.linalg.cholesky(precision).T


def fit_prototype(
    features: np.ndarray, covariance: str, ridge: float, limit_quantile: float, limit_margin: float
) -> Prototype:
    """Prototype from a task's pooled training features (N,C).

    The unknown-product limit is ``limit_margin`` times the ``limit_quantile`` of held-out
    distances (5-fold: each fold scored by a prototype fitted without it), because in-sample
    distances understate how far a new normal image of the product lands.
    """
    feats = np.asarray(features, dtype=np.float64)
    if feats.ndim != 2 or len(feats) < LIMIT_FOLDS:
        raise ValueError(f"a router prototype needs at least {LIMIT_FOLDS} training images, got {len(feats)}")
    mean, whitener = _mean_and_whitener(feats, covariance, ridge)
    folds = np.arange(len(feats)) % LIMIT_FOLDS
    held_out = []
    for fold in range(LIMIT_FOLDS):
        fold_mean, fold_whitener = _mean_and_whitener(feats[folds != fold], covariance, ridge)
        held_out.append(np.sum(((feats[folds == fold] - fold_mean) @ fold_whitener.T) ** 2, axis=1))
    limit = float(np.quantile(np.concatenate(held_out), limit_quantile) * limit_margin)
    return Prototype(np.ascontiguousarray(mean, np.float32), np.ascontiguousarray(whitener, np.float32), limit)


class RouterTable:
    """All prototypes stacked so that one matrix product gives every task's distance."""

    def __init__(self, tasks: list[str], prototypes: list[Prototype]) -> None:
        if not tasks:
            raise ValueError("a router needs at least one task")
        self.tasks = list(tasks)
        self.whiteners = np.stack([p.whitener for p in prototypes]).astype(np.float32)  # (T,C,C)
        self.stacked = self.whiteners.reshape(-1, self.whiteners.shape[-1]).T.copy()  # (C, T*C)
        self.shift = np.stack([p.whitener @ p.mean for p in prototypes]).astype(np.float32)  # (T,C) = W_t mu_t
        self.limits = np.array([p.limit for p in prototypes], dtype=np.float32)

    def distances(self, features: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distances (B,T) of pooled features (B,C): ||W_t f - W_t mu_t||^2."""
        projected = (np.asarray(features, dtype=np.float32) @ self.stacked).reshape(len(features), *self.shift.shape)
        return np.sum((projected - self.shift) ** 2, axis=2)

    def route(self, distances: np.ndarray) -> list[str]:
        """Nearest task per frame, or UNKNOWN where even the nearest is beyond its limit."""
        nearest = np.argmin(distances, axis=1)
        within = distances[np.arange(len(distances)), nearest] <= self.limits[nearest]
        return [self.tasks[i] if ok else UNKNOWN for i, ok in zip(nearest, within)]
