"""Calibration: the order-statistic threshold's FPR, and export -> calibrate -> Runtime.load end to end."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from moleflow_edge.augment import jpeg_round_trips
from moleflow_edge.calibration import CalibrationError, calibrate, threshold_for_fpr
from moleflow_edge.calibration.order_statistics import fpr_upper_bound, min_normal_count
from moleflow_edge.contract import MANIFEST_FILE, load_manifest
from moleflow_edge.data.mvtec import load_split
from moleflow_edge.data.synth import generate
from moleflow_edge.preprocess import read_image_bgr
from moleflow_edge.router import UNKNOWN
from moleflow_edge.runtime import Runtime, RuntimeOptions
from tests.conftest import TINY_CONFIG
from tests.export_fixture import N_TEST_GOOD, TASKS

TARGET = 0.1  # the fixture has 24 normal test images per task


# --- statistics on synthetic scores --------------------------------------------------------------
def test_threshold_fpr_on_a_separate_sample_is_within_the_binomial_range() -> None:
    rng = np.random.default_rng(0)
    target, n, trials, m = 0.01, 299, 400, 20000
    fprs, ks = [], set()
    for _ in range(trials):
        rule = threshold_for_fpr(rng.gamma(2.0, size=n), target)
        fprs.append(float(np.mean(rng.gamma(2.0, size=m) > rule.threshold)))
        ks.add(rule.k)
    assert ks == {3}  # floor(0.01 * 300)
    fprs_arr = np.array(fprs)
    # each trial's true FPR ~ Beta(3, 297): mean 0.01; the held-out estimate adds binomial noise
    assert abs(fprs_arr.mean() - 0.01) < 0.0015
    # about 5 % of trials beyond the 95 % bound (400 trials: 20 +- 4.4), hardly any beyond 99.9 %
    assert 0.02 < np.mean(fprs_arr > fpr_upper_bound(3, n, 0.95)) < 0.09
    assert np.mean(fprs_arr > fpr_upper_bound(3, n, 0.999) + 3 * np.sqrt(0.03 / m)) < 0.01


def test_tolerance_limit_keeps_fpr_below_target_with_confidence() -> None:
    rng = np.random.default_rng(1)
    fprs = []
    for _ in range(300):
        rule = threshold_for_fpr(rng.normal(size=500), 0.01, confidence=0.9)
        fprs.append(np.mean(rng.normal(size=20000) > rule.threshold))
    assert np.mean(np.array(fprs) > 0.01) < 0.15  # at most 10 % of thresholds exceed the target, plus noise


def test_too_few_scores_is_refused_with_the_count_needed() -> None:
    assert min_normal_count(0.01) == 100
    with pytest.raises(CalibrationError, match="need at least 100"):
        threshold_for_fpr(np.arange(99.0), 0.01)
    assert threshold_for_fpr(np.arange(100.0), 0.01).threshold == 99.0  # k = 1: the maximum


# --- end to end on a real export -------------------------------------------------------------------
def test_calibrate_sets_thresholds_the_runtime_uses(built: dict, export_copy: Path) -> None:
    before = load_manifest(export_copy)
    assert all(not t.thresholds for t in before.tasks)
    report = calibrate(export_copy, built["data"], target_fpr=TARGET)
    manifest = load_manifest(export_copy)  # hashes still verify: only decision fields changed
    assert [a.sha256 for a in manifest.artifacts()] == [a.sha256 for a in before.artifacts()]
    assert manifest.int8_calibration and report.int8_calibration == manifest.int8_calibration
    for entry, row in zip(manifest.tasks, report.tasks, strict=True):
        assert entry.thresholds == {"fp32": row.threshold} and entry.distance_limit == row.distance_limit
        record = entry.calibrations["fp32"]
        assert record.n == N_TEST_GOOD and record.source == f"{entry.name}/test/good"
        assert row.k == 2 and row.defects > 0 and row.recall is not None
    with Runtime.load(export_copy, RuntimeOptions("onnxruntime")) as runtime:
        for task in TASKS:
            files = sorted((built["data"] / task / "test" / "good").glob("*.png"))
            results = runtime.infer([read_image_bgr(f) for f in files], with_maps=False)
            routed = [r for r in results if r.task == task]
            assert routed and all(r.is_anomaly is not None for r in routed)
            assert all(r.threshold == manifest.task(task).thresholds["fp32"] for r in routed)
            # k = 2 of 24: exactly one normal image scores above the threshold (when routed home)
            assert sum(r.is_anomaly for r in routed) <= 1


def test_calibrated_limits_let_jpeg_good_frames_of_known_products_in(
    built: dict, export_copy: Path, synth_root: Path, tmp_path: Path
) -> None:
    """Fresh good frames of the calibrated products, sent as JPEG q90 and q75, are never stopped as
    unknown (calibrate keeps the router's tolerance); products never learned still are."""
    fresh = tmp_path / "fresh"  # other good images of the same products than those calibrated on
    generate(fresh, TASKS, seed=7, image_size=TINY_CONFIG.image_size, n_train=2, n_test_good=30, n_test_defect=1)
    calibrate(export_copy, built["data"], target_fpr=TARGET)
    with Runtime.load(export_copy, RuntimeOptions("onnxruntime")) as runtime:
        for task in TASKS:
            split = load_split(fresh, task, "test", TINY_CONFIG.image_size)
            for quality in (90, 75):
                frames = jpeg_round_trips(split.images[split.labels == 0], (quality,))[0]
                routed = [r.task for r in runtime.infer(list(frames), with_maps=False)]
                assert routed == [task] * len(frames), f"{task} at JPEG {quality}: {routed.count(UNKNOWN)} stopped"
        for product in ("screw", "cap"):  # in synth_root, never learned by the fixture
            images = load_split(synth_root, product, "test", TINY_CONFIG.image_size).images
            jpeg = jpeg_round_trips(images, (75,))[0]
            assert {r.task for r in runtime.infer([*images, *jpeg], with_maps=False)} == {UNKNOWN}


def test_calibrate_sets_limits_by_the_rule_the_export_records(built: dict, export_copy: Path) -> None:
    """The limit's margin and quantile come from the manifest (export records the model's config): a
    margin twice as large gives limits twice as large, and the record says how they were made."""
    manifest = load_manifest(export_copy)
    assert (manifest.router_limit_margin, manifest.router_limit_quantile) == (
        TINY_CONFIG.router_limit_margin, TINY_CONFIG.router_limit_quantile)  # fmt: skip
    first = calibrate(export_copy, built["data"], target_fpr=TARGET)
    data = json.loads((export_copy / MANIFEST_FILE).read_text())
    data["router_limit_margin"] = 2 * TINY_CONFIG.router_limit_margin
    (export_copy / MANIFEST_FILE).write_text(json.dumps(data))
    second = calibrate(export_copy, built["data"], target_fpr=TARGET)
    for a, b in zip(first.tasks, second.tasks, strict=True):
        assert b.distance_limit == pytest.approx(2 * a.distance_limit, rel=1e-9)
        assert a.max_normal_distance < a.distance_limit
    method = load_manifest(export_copy).tasks[0].calibrations["fp32"].distance_limit_method
    assert f"{2 * TINY_CONFIG.router_limit_margin:g} x" in method and "JPEG round trips" in method


def test_calibrating_twice_gives_an_identical_manifest(built: dict, export_copy: Path) -> None:
    calibrate(export_copy, built["data"], target_fpr=TARGET)
    first = (export_copy / "manifest.json").read_bytes()
    calibrate(export_copy, built["data"], target_fpr=TARGET)
    assert (export_copy / "manifest.json").read_bytes() == first
    assert "time" not in json.dumps(json.loads(first)["tasks"][0]["calibrations"])


def test_too_few_images_for_the_rate_give_the_tightest_supported_one(built: dict, export_copy: Path) -> None:
    report = calibrate(export_copy, built["data"], target_fpr=0.01)  # 24 images; 0.01 needs 100
    for row in report.tasks:
        assert (row.n, row.k, row.target_met) == (N_TEST_GOOD, 1, False)
        assert row.expected_fpr == pytest.approx(1 / (N_TEST_GOOD + 1))
    assert load_manifest(export_copy).task(TASKS[0]).thresholds["fp32"] == report.tasks[0].threshold


def test_held_out_calib_folder_is_preferred(built: dict, export_copy: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(built["data"], data)
    for task in TASKS:
        shutil.copytree(data / task / "test" / "good", data / task / "calib" / "good")
        for extra in sorted((data / task / "test" / "good").glob("*.png"))[:5]:
            shutil.copy(extra, data / task / "calib" / "good" / f"copy_{extra.name}")
    report = calibrate(export_copy, data, target_fpr=TARGET, tasks=[TASKS[0]])
    assert report.tasks[0].source == f"{TASKS[0]}/calib/good" and report.tasks[0].n == N_TEST_GOOD + 5


def test_calibration_imports_no_torch() -> None:
    code = textwrap.dedent(
        """
        import sys
        import moleflow_edge.calibration
        import moleflow_edge.serving.triton.decisions  # what calibrate refreshes a Triton repository with
        assert not [m for m in sys.modules if m == "torch" or m.startswith("torch.")]
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)
