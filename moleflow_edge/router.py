"""Mahalanobis prototype router: which product is in the frame, or none of them.

Torch-free (numpy only): training fits prototypes with it, and the runtime computes the
same distances, so both sides route identically.

Few images. A product may be learned from as few as ``MIN_IMAGES`` good images. Three rules
keep its prototype and its unknown-product limit well defined down to two images:

- Covariance: Ledoit-Wolf shrinkage towards a scaled identity whose scale (mean variance per
  channel) comes from all the task's images, with at least ``PRIOR_IMAGES / (PRIOR_IMAGES + n - 1)``
  of the weight on that target (the target counts as two images' worth of evidence). Ledoit-Wolf's
  own estimate is 0 at two images (the two centred samples are mirror images, so the sample
  covariance looks free of error), which would leave a singular rank-1 covariance.
- Limit folds: ``min(LIMIT_FOLDS, n)`` folds, so leave-one-out below five images. Every fold
  shrinks towards the same target, because a fold fitted on one image has no spread of its own.
- Widening: below ``FEW_IMAGES`` images the limit is multiplied by ``ln(FEW_IMAGES + 1) / ln(n + 1)``.
  The largest of n held-out distances estimates only their n/(n+1) quantile; for an exponential
  tail a quantile grows with ln(1 / (1 - p)), so this is how much farther the 10/11 quantile lies
  than the n/(n+1) one (measured: docs/decisions.md#few-image-widening).

Every task keeps the identity target, not the pooled covariance of the earlier tasks: a prototype
must not depend on which tasks came before (docs/decisions.md#router-identity-target).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace

import numpy as np

from moleflow_edge.config import Covariance
from moleflow_edge.errors import UserError

UNKNOWN = "unknown"
MIN_IMAGES = 2  # a mean and a spread need two images
LIMIT_FOLDS = 5  # held-out folds for the limit; leave-one-out below this many images
FEW_IMAGES = 10  # below this a product is "few-image": its limit is widened
PRIOR_IMAGES = 2  # weight of the shrinkage target, in images
EXPLAIN_CANDIDATES = 3  # a frame beyond every limit is shown under the best of its nearest tasks' detectors


@dataclass(frozen=True)
class Prototype:
    """One task's routing prototype: mean (C,), whitener W (C,C) with precision P = W^T W, distance limit.

    ``images`` is how many training images it was fitted on (None where not recorded: export router
    files, and task files of version 1, migrations/model_dir.py), so reports can say when a limit rests
    on few images.
    ``patch_level`` is where the task's detector puts normal patches it did not train on (``patch_level``):
    a frame beyond every limit is compared with each candidate task on that task's own scale
    (None where a version-1 task file has none, migrations/model_dir.py).
    """

    mean: np.ndarray
    whitener: np.ndarray
    limit: float
    images: int | None = None
    patch_level: tuple[float, float] | None = None  # (median, robust spread) of held-out normal patch scores


def ledoit_wolf(centered: np.ndarray, target: np.ndarray | None = None, min_shrink: float = 0.0) -> np.ndarray:
    """Ledoit-Wolf shrinkage covariance of centred samples (N,C) towards ``target`` (C,C).

    The target defaults to a scaled identity of the samples' mean variance. With 50-200 images and
    100-2000 channels the sample covariance is singular; shrinkage keeps the distances meaningful
    where the papers' tiny ridge does not. ``min_shrink`` floors the weight on the target.
    """
    n, c = centered.shape
    sample = centered.T @ centered / n
    if target is None:
        target = np.trace(sample) / c * np.eye(c)
    delta = np.sum((sample - target) ** 2) / c
    squares = centered**2
    beta = (np.sum(squares.T @ squares) / n - np.sum(sample**2)) / (c * n)
    shrink = 0.0 if delta == 0 else min(max(beta / delta, 0.0), 1.0)
    shrink = max(shrink, min_shrink)
    return shrink * target + (1.0 - shrink) * sample


def mahalanobis_whitener(covariance: np.ndarray) -> np.ndarray:
    """W (C,C) with W^T W = covariance^-1 (upper Cholesky factor of the symmetrised precision), so
    that ||W (x - mu)||^2 is the squared Mahalanobis distance: the router, the per-task whitening
    adapter and the Gaussian references all whiten with it."""
    precision = np.linalg.inv(covariance)
    return np.linalg.cholesky(0.5 * (precision + precision.T)).T


def limit_widening(images: int) -> float:
    """Factor on the unknown-product limit of a task fitted on ``images`` images (1 from FEW_IMAGES on)."""
    return max(1.0, math.log(FEW_IMAGES + 1) / math.log(images + 1))


def distance_limit(normal: np.ndarray, images: int, quantile: float, margin: float) -> float:
    """The unknown-product limit from squared distances (any shape) of ``images`` normal images and their
    camera variants to a prototype not fitted on them: ``margin`` x ``limit_widening(images)`` x their
    ``quantile``. Training applies it to held-out folds and ``calibrate`` to held-out calibration images
    and their JPEG round trips, so both leave a product the same tolerance."""
    return float(np.quantile(np.asarray(normal, dtype=np.float64), quantile) * margin * limit_widening(images))


def _mean_and_whitener(
    features: np.ndarray, images: int, covariance: str, ridge: float, target: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and whitener of (M,C) feature rows that come from ``images`` images (M > images where
    the rows include variants): the shrinkage prior weighs against images, not rows."""
    mean = features.mean(axis=0)
    centered = features - mean
    n = len(features)
    if Covariance(covariance) is Covariance.LEDOIT_WOLF:
        cov = ledoit_wolf(centered, target, PRIOR_IMAGES / (PRIOR_IMAGES + images - 1))
    else:
        cov = centered.T @ centered / max(n - 1, 1) + ridge * np.eye(features.shape[1])
    return mean, mahalanobis_whitener(cov)


def fit_prototype(
    features: np.ndarray,
    covariance: str,
    ridge: float,
    limit_quantile: float,
    limit_margin: float,
    variants: np.ndarray | None = None,
) -> Prototype:
    """Prototype from a task's pooled training features (N,C), N >= MIN_IMAGES.

    The unknown-product limit is ``distance_limit`` of held-out distances (each fold scored by a
    prototype fitted without it), because in-sample distances understate how far a new normal
    image of the product lands.

    ``variants`` (V,N,C): the same images' features after changes a camera makes to a good part
    (JPEG round trips, augment.jpeg_round_trips). They enter the mean and covariance as more rows
    and the held-out distances with their image's fold. In the covariance they widen only the thin
    directions compression moves a frame along (docs/decisions.md#router-jpeg-variants).
    """
    feats = np.asarray(features, dtype=np.float64)
    if feats.ndim != 2 or len(feats) < MIN_IMAGES:
        raise UserError(f"a router prototype needs at least {MIN_IMAGES} training images, got {len(feats)}")
    n, c = feats.shape
    spread = np.sum((feats - feats.mean(axis=0)) ** 2) / (n * c)  # mean variance per channel
    if spread <= 1e-12 * np.mean(feats**2):
        raise UserError(f"the {n} training images give identical router features: add distinct good images")
    target = spread * np.eye(c)
    extra = np.zeros((0, n, c)) if variants is None else np.asarray(variants, dtype=np.float64).reshape(-1, n, c)
    views = np.concatenate([feats[None], extra])  # (1+V,N,C): the originals first

    def rows(images: np.ndarray) -> np.ndarray:
        return views[:, images].reshape(-1, c)

    mean, whitener = _mean_and_whitener(rows(np.arange(n)), n, covariance, ridge, target)
    k = min(LIMIT_FOLDS, n)
    folds = np.arange(n) % k
    held_out = []
    for fold in range(k):
        fitted = np.flatnonzero(folds != fold)
        fold_mean, fold_whitener = _mean_and_whitener(rows(fitted), len(fitted), covariance, ridge, target)
        held_out.append(np.sum(((rows(np.flatnonzero(folds == fold)) - fold_mean) @ fold_whitener.T) ** 2, axis=1))
    limit = distance_limit(np.concatenate(held_out), n, limit_quantile, limit_margin)
    return Prototype(np.ascontiguousarray(mean, np.float32), np.ascontiguousarray(whitener, np.float32), limit, n)


class RouterTable:
    """All prototypes stacked so that one matrix product gives every task's distance."""

    def __init__(self, tasks: list[str], prototypes: list[Prototype], kinds: list[str] | None = None) -> None:
        """``kinds``: each task's detector kind (one kind for all where None): patch scores of different
        kinds are on scales that cannot be compared (see ``explaining_task``)."""
        if not tasks:
            raise ValueError("a router needs at least one task")
        if kinds is not None and len(kinds) != len(tasks):
            raise ValueError(f"{len(kinds)} detector kinds for {len(tasks)} tasks")
        self.tasks = list(tasks)
        self.prototypes = list(prototypes)
        self.kinds = dict(zip(self.tasks, kinds or [""] * len(self.tasks), strict=True))
        self.whiteners = np.stack([p.whitener for p in prototypes]).astype(np.float32)  # (T,C,C)
        self.stacked = self.whiteners.reshape(-1, self.whiteners.shape[-1]).T.copy()  # (C, T*C)
        self.shift = np.stack([p.whitener @ p.mean for p in prototypes]).astype(np.float32)  # (T,C) = W_t mu_t
        self.limits = np.array([p.limit for p in prototypes], dtype=np.float32)
        self.patch_levels = {t: p.patch_level for t, p in zip(self.tasks, prototypes, strict=True)}

    def first(self, known: int) -> RouterTable:
        """The router over the first ``known`` tasks alone, with their limits as they are now."""
        kept = [
            replace(p, limit=float(limit))
            for p, limit in zip(self.prototypes[:known], self.limits[:known], strict=True)
        ]
        return RouterTable(self.tasks[:known], kept, [self.kinds[t] for t in self.tasks[:known]])

    def distances(self, features: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distances (B,T) of pooled features (B,C): ||W_t f - W_t mu_t||^2."""
        projected = (np.asarray(features, dtype=np.float32) @ self.stacked).reshape(len(features), *self.shift.shape)
        return np.sum((projected - self.shift) ** 2, axis=2)

    def nearest(self, distances: np.ndarray, known: int | None = None) -> list[str]:
        """Nearest of the first ``known`` tasks (all by default) per frame, no limit applied: which
        product the router sees, what eval's routing accuracy counts."""
        return [self.tasks[i] for i in np.argmin(distances[:, :known], axis=1)]

    def candidates(self, distances: np.ndarray, known: int | None = None) -> list[tuple[str, ...]]:
        """The ``EXPLAIN_CANDIDATES`` nearest of the first ``known`` tasks per frame, nearest first:
        whose detectors may explain a frame that ``assign`` finds beyond every limit."""
        order = np.argsort(distances[:, :known], axis=1, kind="stable")[:, :EXPLAIN_CANDIDATES]
        return [tuple(self.tasks[i] for i in row) for row in order]

    def explaining_task(
        self, candidates: tuple[str, ...], patch_scores: list[np.ndarray], distances: np.ndarray
    ) -> str:
        """Of a frame's candidate tasks, their detectors' patch scores (H,W) for it and its distances (T,)
        to every prototype, the task that explains the frame best. A frame beyond every limit is often a
        damaged part of a known product: its pooled routing feature moves as a whole, while the
        product's own detector still finds most of its patches normal. So among tasks of one detector
        kind, the lowest median patch score in units of each task's normal ``patch_level`` wins. Kinds
        grow differently away from normal (a flow's -log p with the squared distance, a memory bank's
        nearest distance linearly), so between the best of each kind the routing distance decides, in
        units of each task's limit. The runtime and eval draw such a frame's map from this task."""
        levels = [self.patch_levels[t] for t in candidates]
        if any(level is None for level in levels):  # a task without a recorded level: compare raw scores
            levels = [(0.0, 1.0)] * len(candidates)
        excess = [(np.median(p) - centre) / spread for p, (centre, spread) in zip(patch_scores, levels, strict=True)]
        best_of_kind: dict[str, int] = {}
        for i, task in enumerate(candidates):
            kind = self.kinds[task]
            if kind not in best_of_kind or excess[i] < excess[best_of_kind[kind]]:
                best_of_kind[kind] = i
        column = {t: i for i, t in enumerate(self.tasks)}
        reach = {
            i: distances[column[candidates[i]]] / self.limits[column[candidates[i]]] for i in best_of_kind.values()
        }
        return candidates[min(reach, key=lambda i: reach[i])]

    def assign(self, distances: np.ndarray, known: int | None = None) -> list[str]:
        """Nearest of the first ``known`` tasks per frame, or UNKNOWN where even the nearest is
        beyond its limit: the one routing rule of the runtime, eval and the bench."""
        nearest = np.argmin(distances[:, :known], axis=1)
        within = distances[np.arange(len(distances)), nearest] <= self.limits[nearest]
        return [self.tasks[i] if ok else UNKNOWN for i, ok in zip(nearest, within, strict=True)]


def patch_level(patch_scores: np.ndarray) -> tuple[float, float]:
    """(median, 1.4826 x median absolute deviation) of a task's patch scores on normal images it did not
    train on: its detector's own scale, so that tasks fitted on 4 or 200 images can be compared."""
    scores = np.asarray(patch_scores, dtype=np.float64).ravel()
    centre = float(np.median(scores))
    return centre, max(float(np.median(np.abs(scores - centre))) * 1.4826, 1e-6)


def router_weights(tasks: list[str], prototypes: dict[str, Prototype]) -> bytes:
    """router.safetensors as bytes: <task>.mean (C,), <task>.whitener (C,C) and <task>.patch_level (2,),
    float32, in ``tasks`` order. Torch-free, so the exporter and the benchmark's grown exports write
    the same file."""
    from safetensors.numpy import save

    tensors = {}
    for task in tasks:
        tensors[f"{task}.mean"] = np.ascontiguousarray(prototypes[task].mean, np.float32)
        tensors[f"{task}.whitener"] = np.ascontiguousarray(prototypes[task].whitener, np.float32)
        if prototypes[task].patch_level is not None:
            tensors[f"{task}.patch_level"] = np.asarray(prototypes[task].patch_level, np.float32)
    return save(tensors, metadata={"tasks": json.dumps(tasks)})
