"""The threshold rule: distribution-free order statistics over normal scores. Torch-free, numpy only.

Threshold rule (distribution-free, order statistics). Decision: anomaly when score > t.
With n normal scores, t = the k-th largest score. For exchangeable normal images a new
normal image exceeds the k-th largest of n with probability exactly k/(n+1), so
k = floor(target_fpr * (n+1)) gives an expected FPR <= target_fpr (the conformal quantile).
k >= 1 needs n >= ceil(1/target_fpr) - 1; the rule asks for ceil(1/target_fpr) images (100
at 1 % FPR). The true FPR of that t is Beta(k, n+1-k) distributed; the report gives its 95 %
upper bound, so the user sees how loose a small sample is. With ``confidence`` set, k is
instead the largest with P(FPR > target) <= 1 - confidence (a tolerance limit); it needs more.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from moleflow_edge.errors import UserError

UPPER_BOUND_LEVEL = 0.95
TARGET_FPR = 0.01  # the false-positive rate a threshold aims at unless told otherwise (calibrate, learn)
MIN_NORMALS = 5  # fewer normal images give no threshold worth deploying (E[FPR] of the maximum: 1/6)


class CalibrationError(UserError):
    """Too few or missing normal images, or an export that cannot be calibrated; says what to add."""


def _binom_sf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) >= k), exact, summed in log space."""
    if k <= 0:
        return 1.0
    if k > n or p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    log_fact = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1)))])
    j = np.arange(k, n + 1)
    log_terms = log_fact[n] - log_fact[j] - log_fact[n - j] + j * math.log(p) + (n - j) * math.log1p(-p)
    return float(min(1.0, np.exp(log_terms).sum()))


def _fpr_exceeds(k: int, n: int, target: float) -> float:
    """P(true FPR of the k-th largest of n normal scores > target); FPR ~ Beta(k, n+1-k).

    P(Beta(k, n+1-k) <= p) = P(Binomial(n, p) >= k).
    """
    return 1.0 - _binom_sf(k, n, target)


def fpr_upper_bound(k: int, n: int, level: float = UPPER_BOUND_LEVEL) -> float:
    """The ``level`` quantile of the true FPR of the k-th largest of n normal scores (bisection)."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if _binom_sf(k, n, mid) >= level:
            hi = mid
        else:
            lo = mid
    return hi


def min_normal_count(target_fpr: float, confidence: float | None = None) -> int:
    """Fewest normal images for which some order statistic meets the rule (k >= 1)."""
    if not 0.0 < target_fpr < 1.0:
        raise CalibrationError(f"target_fpr must be in (0, 1), got {target_fpr}")
    if confidence is None:
        return math.ceil(1.0 / target_fpr)
    # k = 1 (the maximum) qualifies when (1 - target)^n <= 1 - confidence
    return math.ceil(math.log(1.0 - confidence) / math.log(1.0 - target_fpr))


@dataclass(frozen=True)
class QuantileThreshold:
    """A threshold from n normal scores: the k-th largest, its expected FPR and 95 % FPR bound."""

    threshold: float
    k: int
    n: int
    expected_fpr: float  # k / (n+1)
    fpr_upper95: float
    method: str
    target_met: bool = True  # False: too few images for the requested rate; the tightest supported one is used


def threshold_for_fpr(
    scores: np.ndarray, target_fpr: float, *, confidence: float | None = None, min_count: int | None = None
) -> QuantileThreshold:
    """Threshold t (anomaly when score > t) with FPR <= ``target_fpr`` on normal scores (n,).

    ``confidence`` None: expected FPR <= target (k = floor(target (n+1))). Otherwise
    P(FPR > target) <= 1 - confidence. Refuses fewer than ``min_count`` (default: the
    least n for which the rule can hold) scores.
    """
    values = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    n = len(values)
    needed = min_normal_count(target_fpr, confidence) if min_count is None else int(min_count)
    needed = max(needed, min_normal_count(target_fpr, confidence))
    if n < needed:
        raise CalibrationError(
            f"{n} normal images cannot support a {target_fpr:g} false-positive rate: need at least {needed} "
            f"(order-statistic rule, {'expected FPR' if confidence is None else f'{confidence:g} confidence'}); "
            "add normal images or raise --target-fpr"
        )
    if not np.all(np.isfinite(values)):
        raise CalibrationError("some normal scores are not finite: the export or the images are broken")
    if confidence is None:
        k = max(1, math.floor(target_fpr * (n + 1) + 1e-9))
        method = "conformal order statistic: k-th largest, k = floor(target_fpr*(n+1)), E[FPR] = k/(n+1)"
    else:
        k = 1
        while k < n and _fpr_exceeds(k + 1, n, target_fpr) <= 1.0 - confidence:
            k += 1
        method = f"tolerance limit: k-th largest, largest k with P(FPR > target_fpr) <= {1 - confidence:g}"
    return QuantileThreshold(
        threshold=float(values[n - k]),
        k=k,
        n=n,
        expected_fpr=k / (n + 1),
        fpr_upper95=fpr_upper_bound(k, n),
        method=method,
    )


def f1_optimal(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(threshold, F1) maximising F1 over thresholds at the observed scores (anomaly: score > t)."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, bool)
    best_t, best_f1 = float("nan"), -1.0
    candidates = np.unique(scores)
    for t in np.concatenate([[candidates[0] - 1.0], candidates]):
        _, _, f1 = precision_recall(scores, labels, float(t))
        if f1 > best_f1:
            best_t, best_f1 = float(t), f1
    return best_t, best_f1


def precision_recall(scores: np.ndarray, labels: np.ndarray, threshold: float) -> tuple[float, float, float]:
    predicted = np.asarray(scores) > threshold
    labels = np.asarray(labels, bool)
    tp = int(np.sum(predicted & labels))
    fp = int(np.sum(predicted & ~labels))
    fn = int(np.sum(~predicted & labels))
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def supported_threshold(scores: np.ndarray, target_fpr: float, *, confidence: float | None = None) -> QuantileThreshold:
    """The rule's threshold where the n scores support ``target_fpr``; otherwise the tightest rate
    they do support: the largest normal score, E[FPR] = 1/(n+1), with ``target_met`` False."""
    n = len(np.ravel(scores))
    needed = min_normal_count(target_fpr, confidence)
    if n >= needed:
        return threshold_for_fpr(scores, target_fpr, confidence=confidence)
    if n < MIN_NORMALS:
        raise CalibrationError(
            f"{n} normal images are too few to calibrate (at least {MIN_NORMALS}; {needed} for a {target_fpr:g} "
            "false-positive rate)"
        )
    values = np.asarray(scores, dtype=np.float64).ravel()
    if not np.all(np.isfinite(values)):
        raise CalibrationError("some normal scores are not finite: the export or the images are broken")
    method = (
        f"tightest rate the data supports: the largest of {n} normal scores, E[FPR] = 1/(n+1) = "
        f"{1 / (n + 1):.3f} (the requested {target_fpr:g} needs {needed} normal images)"
    )
    return QuantileThreshold(float(values.max()), 1, n, 1 / (n + 1), fpr_upper_bound(1, n), method, False)
