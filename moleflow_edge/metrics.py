"""The field's usual detection metrics, in numpy and OpenCV (no scikit-learn needed on a line PC;
the tests check them against scikit-learn)."""

from __future__ import annotations

import cv2
import numpy as np


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve via the Mann-Whitney rank statistic (ties count one half)."""
    labels = np.asarray(labels).ravel().astype(bool)
    scores = np.asarray(scores, dtype=np.float64).ravel()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts + 1) / 2.0  # 1-based average rank of each tie group
    ranks[order] = np.repeat(average, counts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision: sum over thresholds of (recall step) x precision, ties as one threshold."""
    labels = np.asarray(labels).ravel().astype(bool)
    scores = np.asarray(scores, dtype=np.float64).ravel()
    n_pos = int(labels.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores, sorted_labels = scores[order], labels[order]
    last_of_group = np.r_[np.nonzero(np.diff(sorted_scores))[0], len(scores) - 1]
    tp = np.cumsum(sorted_labels)[last_of_group]
    precision = tp / (last_of_group + 1)
    recall_step = np.diff(np.r_[0, tp]) / n_pos
    return float(np.sum(recall_step * precision))


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Area under the per-region-overlap curve up to ``fpr_limit``, divided by ``fpr_limit``.

    The MVTec AD definition: every connected defect region (8-connected, per image) weighs the
    same, so a detector is not rewarded for finding only the largest defects. At each threshold
    PRO is the mean over regions of the covered fraction, FPR the fraction of defect-free pixels
    above it. Swept over every distinct score: (N,H,W) masks and maps -> a value in [0, 1].
    """
    masks = np.asarray(masks).astype(bool)
    maps = np.asarray(maps, dtype=np.float64)
    weights = np.zeros(masks.shape, dtype=np.float64)
    regions: list[tuple[int, np.ndarray]] = []
    for i, mask in enumerate(masks):
        count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        regions += [(i, labels == r) for r in range(1, count)]
    normal = ~masks
    if not regions or not normal.any():
        return float("nan")
    for i, region in regions:
        weights[i][region] = 1.0 / (region.sum() * len(regions))
    order = np.argsort(-maps.ravel(), kind="mergesort")
    scores = maps.ravel()[order]
    last_of_group = np.r_[np.nonzero(np.diff(scores))[0], len(scores) - 1]
    fpr = np.r_[0.0, np.cumsum(normal.ravel()[order])[last_of_group] / normal.sum()]
    pro = np.r_[0.0, np.cumsum(weights.ravel()[order])[last_of_group]]
    end = np.searchsorted(fpr, fpr_limit, side="right")  # first point beyond the limit
    if end < len(fpr):  # close the curve exactly at fpr_limit by linear interpolation
        step = (fpr_limit - fpr[end - 1]) / (fpr[end] - fpr[end - 1])
        fpr = np.r_[fpr[:end], fpr_limit]
        pro = np.r_[pro[:end], pro[end - 1] + step * (pro[end] - pro[end - 1])]
    return float(np.sum(np.diff(fpr) * (pro[1:] + pro[:-1]) / 2) / fpr_limit)
