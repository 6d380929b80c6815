"""A camera loop that runs for months, and thresholds per precision (issue 25, items 6 and 7).

Bounded latency statistics, overlays at a capped size, a non-zero exit when every frame failed,
bench saying why it skipped a row, a manifest that does not fit its graph refused at load; and
each precision's frames judged by the threshold calibrated at that precision. Uses the session's
shared small export (tests/export_fixture.py), copied before any change.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from moleflow_edge.calibration import calibrate
from moleflow_edge.contract import CalibrationRecord, ManifestError, Precision, load_manifest
from moleflow_edge.preprocess import read_image_bgr
from moleflow_edge.runtime import RunOutcome, Runtime, RuntimeOptions
from moleflow_edge.runtime.camera_loop import LoopStats
from moleflow_edge.runtime.result import FrameResult
from tests.export_fixture import TASKS, normal_subset
from tests.test_trust import _edit_manifest, _run


# --- 6. the camera loop -----------------------------------------------------------------------------
def test_latency_statistics_stay_bounded_and_close_to_the_exact_percentiles() -> None:
    from moleflow_edge.runtime.latency_stats import LatencyReservoir

    values = np.random.default_rng(1).gamma(2.0, 3.0, size=60_000)
    reservoir = LatencyReservoir(capacity=4096)
    for value in values:
        reservoir.add(float(value))
    assert reservoir.count == 60_000 and reservoir.kept == 4096
    exact = np.percentile(values, [50, 90, 99])
    for (name, estimate), truth in zip(reservoir.percentiles().items(), exact, strict=True):
        assert estimate == pytest.approx(truth, rel=0.08), name
    short = LatencyReservoir(capacity=100)
    for value in (3.0, 1.0, 2.0):
        short.add(value)
    assert short.percentiles() == {"p50": 2.0, "p90": 2.8, "p99": 2.98}  # exact below the capacity
    stats = LoopStats()
    for _ in range(20_000):
        stats.add(FrameResult(index=0, task=TASKS[0]))
    assert all(r.kept <= r.capacity and r.count == 20_000 for r in stats.latencies.values())


def test_saved_overlays_of_a_huge_frame_are_drawn_at_the_capped_size(built: dict, tmp_path: Path) -> None:
    frame = read_image_bgr(sorted((built["data"] / TASKS[0] / "test" / "good").glob("*.png"))[0])
    frames = tmp_path / "frames"
    frames.mkdir()
    cv2.imwrite(str(frames / "huge.png"), cv2.resize(frame, (1200, 1800), interpolation=cv2.INTER_LINEAR))
    code, out, _ = _run(built["export_dir"], frames, save_dir=tmp_path / "maps", max_map_side=300)
    assert code is RunOutcome.DONE
    overlay = cv2.imread(json.loads(out.splitlines()[0])["overlay"])
    assert overlay.shape == (300, 200, 3)  # longest side capped like the map, aspect kept


def test_run_exits_non_zero_when_every_frame_failed(built: dict, tmp_path: Path) -> None:
    frames = tmp_path / "frames"
    frames.mkdir()
    for name in ("a.png", "b.jpg"):
        (frames / name).write_bytes(b"not an image")
    code, out, err = _run(built["export_dir"], frames)
    assert code is RunOutcome.ALL_FRAMES_FAILED and "every frame failed (2 of 2)" in err
    assert json.loads(out.splitlines()[-1])["summary"]["outcome"] == "all_frames_failed"
    shutil.copy(sorted((built["data"] / TASKS[0] / "test" / "good").glob("*.png"))[0], frames / "c.png")
    code, _, err = _run(built["export_dir"], frames)
    assert code is RunOutcome.DONE and "every frame failed" not in err  # one good frame among bad ones: a normal run


def test_bench_says_why_it_skipped_a_row(built: dict) -> None:
    from moleflow_edge.bench.run import bench

    printed: list[str] = []
    bench(built["export_dir"], ("torch-eager", "onnxruntime-cpu"), ("fp32",), (1,), iters=1, task_counts=(),
          printer=printed.append)  # fmt: skip
    skipped = [line for text in printed for line in text.splitlines() if line.startswith("skipped torch-eager fp32")]
    assert len(skipped) == 1 and "--model" in skipped[0], printed


def test_a_manifest_whose_image_size_is_valid_but_wrong_is_refused_at_load(built: dict, export_copy: Path) -> None:
    _edit_manifest(export_copy, lambda data: data.update(image_size=96))
    load_manifest(export_copy)  # the schema and the hashes are fine
    with pytest.raises(ManifestError, match=r"does not match the manifest \(image_size 96\).*images"):
        Runtime.load(export_copy, RuntimeOptions("onnxruntime"))
    code, out, err = _run(export_copy, built["data"] / TASKS[0] / "test" / "good")
    assert code is RunOutcome.LOAD_FAILED and "image_size 96" in err and "Traceback" not in err
    assert len(out.splitlines()) == 1  # no frame was tried


# --- 7. thresholds per precision -----------------------------------------------------------------------
def test_each_precision_is_judged_by_its_own_threshold(built: dict, export_copy: Path, tmp_path: Path) -> None:
    data = normal_subset(built["data"], tmp_path / "data", 10)
    calibrate(export_copy, data, target_fpr=0.1, precision="fp32")
    with Runtime.load(export_copy, RuntimeOptions("onnxruntime", precision="int8")) as runtime:
        assert runtime.uncalibrated == TASKS  # fp32's threshold is never applied to int8 scores
        assert runtime.task_status()[TASKS[0]] == "uncalibrated at int8 (calibrated at fp32)"
        assert runtime.infer_one(read_image_bgr(next(data.rglob("*.png")))).is_anomaly is None
    code, _, err = _run(export_copy, data / TASKS[0] / "test" / "good", precision="int8")
    assert code is RunOutcome.DONE and "not calibrated at int8" in err and "--precision int8" in err
    int8 = {row.task: row.threshold for row in calibrate(export_copy, data, target_fpr=0.1, precision="int8").tasks}
    fp32 = {row.task: row.threshold for row in calibrate(export_copy, data, target_fpr=0.1, precision="fp32").tasks}
    assert int8 != fp32  # scores differ between precisions, and so do their thresholds
    manifest = load_manifest(export_copy)
    for entry in manifest.tasks:  # the fp32 run (last) kept int8's record
        assert entry.thresholds == {"int8": int8[entry.name], "fp32": fp32[entry.name]}
        assert {p: c.precision for p, c in entry.calibrations.items()} == {"int8": "int8", "fp32": "fp32"}
    frames = [read_image_bgr(p) for p in sorted((data / TASKS[0] / "test" / "good").glob("*.png"))]
    for precision, thresholds in (("int8", int8), ("fp32", fp32)):
        with Runtime.load(export_copy, RuntimeOptions("onnxruntime", precision=precision)) as runtime:
            results = [r for r in runtime.infer(frames, with_maps=False) if r.task in thresholds]
            assert results and all(r.threshold == thresholds[r.task] for r in results), precision
            assert all(r.is_anomaly == (r.image_score > r.threshold) for r in results)


def test_a_manifest_from_before_thresholds_per_precision_still_loads(export_copy: Path) -> None:
    def old_style(data: dict) -> None:  # format version 1, as written before thresholds per precision
        data["format_version"] = 1
        data["tasks"][0].update(threshold=1.5, calibration={"precision": "int8", "n": 10})
        data["tasks"][1].update(threshold=2.5, calibration={})  # older still: no precision recorded (fp32)

    _edit_manifest(export_copy, old_style)
    manifest = load_manifest(export_copy)
    assert manifest.task(TASKS[0]).thresholds == {"int8": 1.5}
    assert manifest.task(TASKS[0]).calibrations == {"int8": CalibrationRecord(Precision.INT8, n=10)}
    assert manifest.task(TASKS[1]).thresholds == {"fp32": 2.5}
    with Runtime.load(export_copy, RuntimeOptions("onnxruntime")) as runtime:
        assert runtime.uncalibrated == [TASKS[0]]
    saved = json.loads(manifest.to_json())["tasks"][0]
    assert "threshold" not in saved and saved["thresholds"] == {"int8": 1.5}  # written back in the new form
