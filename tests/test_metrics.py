"""Detection metrics against scikit-learn, and AUPRO on masks whose answer is known by hand."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from moleflow_edge.metrics import aupro, auroc, average_precision


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_and_ap_match_scikit_learn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.random(500) < 0.2
    scores = np.round(rng.normal(size=500) + labels, 1)  # rounding makes many ties
    assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert average_precision(labels, scores) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)


def _two_region_masks() -> np.ndarray:
    masks = np.zeros((2, 10, 10), dtype=bool)
    masks[0, 0:2, 0:2] = True  # region A: 4 pixels
    masks[1, 5:9, 5:9] = True  # region B: 16 pixels
    return masks


def test_aupro_perfect_map_is_one_and_constant_map_is_its_chance_area() -> None:
    masks = _two_region_masks()
    assert aupro(masks, masks.astype(float)) == pytest.approx(1.0)
    # one tie group: the curve jumps from (0,0) to (1,1), so up to FPR 0.3 PRO = FPR: area 0.045/0.3
    assert aupro(masks, np.zeros(masks.shape)) == pytest.approx(0.5 * 0.3)


def test_aupro_weighs_every_region_the_same() -> None:
    masks = _two_region_masks()
    maps = np.zeros(masks.shape)
    maps[1][masks[1]] = 1.0  # only the large region found, before any false positive
    # PRO is 0.5 (one of two regions) from FPR 0 on; pixel-weighted overlap would say 16/20
    expected = (0.5 * 0.3 + 0.5 * 0.3**2 / 2) / 0.3  # 0.5 flat plus the tie ramp (0.5 -> 1 over FPR 0->1)
    assert aupro(masks, maps) == pytest.approx(expected)


def test_aupro_counts_separate_blobs_in_one_image_as_separate_regions() -> None:
    masks = np.zeros((1, 10, 10), dtype=bool)
    masks[0, 0:2, 0:2] = True
    masks[0, 6:8, 6:8] = True  # not touching: a second region of the same image
    maps = np.zeros(masks.shape)
    maps[0, 0:2, 0:2] = 1.0
    assert aupro(masks, maps) == pytest.approx((0.5 * 0.3 + 0.5 * 0.3**2 / 2) / 0.3)


def test_aupro_without_defects_is_nan() -> None:
    assert np.isnan(aupro(np.zeros((2, 4, 4), bool), np.random.default_rng(0).random((2, 4, 4))))
