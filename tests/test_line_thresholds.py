"""Thresholds a line can move: `calibrate --source` on frames as the camera delivers them (JPEG q90), one
mixed stream assigned by the router, and `calibrate --threshold` by hand, each a new manifest with history."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from moleflow_edge.calibration import calibrate, set_threshold
from moleflow_edge.cli import app
from moleflow_edge.contract import MANIFEST_FILE, ManifestError, load_manifest, save_manifest
from moleflow_edge.data.synth import generate
from moleflow_edge.migrations.manifest import BEFORE_HISTORY
from moleflow_edge.preprocess import resize_frame
from moleflow_edge.runtime import Runtime, RuntimeOptions
from moleflow_edge.signing import SIGNED_MARKER, generate_keypair, load_private_key, load_public_keys
from tests.export_fixture import TASKS

TARGET = 0.1
JPEG_QUALITY = 90


def _jpeg_frames(root: Path, task: str, count: int, seed: int = 11) -> list[Path]:
    """``count`` new good frames of a synthetic product as a camera would send them: JPEG at quality 90."""
    generate(root / "synth", [task], seed=seed, image_size=128, n_train=1, n_test_good=count, n_test_defect=0)
    out = []
    for path in sorted((root / "synth" / task / "test" / "good").glob("*.png")):
        target = root / "jpeg" / task / f"{path.stem}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(target), cv2.imread(str(path)), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        out.append(target)
    return out


def test_calibrate_source_keeps_jpeg_good_frames_within_the_target_rate(export_copy: Path, tmp_path: Path) -> None:
    task = TASKS[0]
    frames = _jpeg_frames(tmp_path, task, 80)
    calib = tmp_path / "camera"
    calib.mkdir()
    for path in frames[:40]:  # the first 40 calibrate, the last 40 are held out to check the rate
        path.rename(calib / path.name)
    args = ["calibrate", "--export", str(export_copy), "--source", str(calib), "--task", task, "--frames", "40",
            "--target-fpr", str(TARGET)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    entry = load_manifest(export_copy).task(task)
    record, threshold = entry.calibrations["fp32"], entry.thresholds["fp32"]
    assert (record.source, record.n, record.frames_taken, record.k) == (str(calib), 40, 40, 4)
    assert record.frames_assigned_by == "the given task" and record.target_met is True
    assert entry.threshold_history[-1].value == threshold and str(calib) in entry.threshold_history[-1].reason

    held_out = [cv2.imread(str(p)) for p in frames[40:]]
    with Runtime.load(export_copy, RuntimeOptions("onnxruntime")) as runtime:
        scores, _ = runtime.score_as(np.stack([resize_frame(f, runtime.image_size) for f in held_out]), task)
    flagged = int(np.sum(scores > threshold))
    # E[FPR] = k/(n+1) = 4/41 <= 0.1; 40 held-out frames: at most the rule's 95 % bound on the rate
    assert flagged <= round(len(held_out) * record.fpr_upper95), (flagged, record.fpr_upper95)


def test_a_mixed_stream_is_assigned_by_the_router_and_unknown_frames_refused(export_copy: Path, tmp_path: Path) -> None:
    per_task = {task: _jpeg_frames(tmp_path, task, 12) for task in TASKS}
    strangers = _jpeg_frames(tmp_path, "cap", 6)  # a product the export does not know
    stream = tmp_path / "stream"
    stream.mkdir()
    mixed = [p for row in zip(*per_task.values(), strict=True) for p in row] + strangers
    for i, path in enumerate(mixed):
        path.rename(stream / f"{i:03d}.jpg")
    before = (export_copy / MANIFEST_FILE).read_bytes()
    result = CliRunner().invoke(app, ["calibrate", "--export", str(export_copy), "--source", str(stream),
                                      "--frames", "30", "--target-fpr", str(TARGET)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "router: {'weave': 12, 'tiles': 12}, 6 unknown (refused)" in result.output
    manifest = load_manifest(export_copy)
    for task in TASKS:
        record = manifest.task(task).calibrations["fp32"]
        assert (record.n, record.frames_taken, record.frames_unknown_refused) == (12, 30, 6)
        assert record.frames_assigned_by == "the router"
    assert (export_copy / MANIFEST_FILE).read_bytes() != before


def test_a_threshold_set_by_hand_is_a_new_manifest_with_history(built: dict, export_copy: Path, tmp_path: Path) -> None:
    calibrate(export_copy, built["data"], target_fpr=TARGET)
    task = TASKS[0]
    calibrated = load_manifest(export_copy).task(task).thresholds["fp32"]
    args = ["calibrate", "--export", str(export_copy), "--task", task, "--threshold", "5.5", "--reason", "night shift"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    entry = load_manifest(export_copy).task(task)
    assert entry.thresholds["fp32"] == 5.5
    old, new = entry.threshold_history
    assert old.value == calibrated and old.reason.startswith("calibrate: target FPR 0.1 on 24 normal images")
    assert (new.value, new.reason, new.precision) == (5.5, "set by hand: night shift", "fp32")
    assert new.time.endswith("Z") and entry.calibrations["fp32"].quantile_method == "set by hand: night shift"
    with Runtime.load(export_copy, RuntimeOptions("onnxruntime")) as runtime:
        assert runtime.spec.task(task).thresholds["fp32"] == 5.5
    same = (export_copy / MANIFEST_FILE).read_bytes()
    assert set_threshold(export_copy, task, 5.5) == 5.5 and (export_copy / MANIFEST_FILE).read_bytes() == same

    # a version-1 threshold from before histories were kept enters the history first, with no time
    data = json.loads((export_copy / MANIFEST_FILE).read_text())
    data["tasks"][1]["threshold_history"].clear()
    old_value = data["tasks"][1]["thresholds"]["fp32"]
    (export_copy / MANIFEST_FILE).write_text(json.dumps({**data, "format_version": 1}))
    assert set_threshold(export_copy, TASKS[1], 7.0, reason="more sensitive") == old_value
    first, second = load_manifest(export_copy).task(TASKS[1]).threshold_history
    assert (first.value, first.time, first.reason) == (old_value, None, BEFORE_HISTORY)
    assert (second.value, second.reason) == (7.0, "set by hand: more sensitive")


def test_a_signed_export_gets_a_signed_manifest_and_a_broken_history_is_refused(
    export_copy: Path, tmp_path: Path
) -> None:
    private, public = generate_keypair(tmp_path / "key")
    save_manifest(export_copy, load_manifest(export_copy), load_private_key(private))
    with pytest.raises(ManifestError, match="is signed: pass --sign"):
        set_threshold(export_copy, TASKS[0], 3.0)
    with pytest.raises(ManifestError, match="is signed: pass --sign"):  # checked, but nothing to sign it again
        set_threshold(export_copy, TASKS[0], 3.0, trusted_keys=[public])
    set_threshold(export_copy, TASKS[0], 3.0, sign=private)
    signed = load_manifest(export_copy, trusted_keys=load_public_keys([public]))  # the signature verifies
    assert signed.task(TASKS[0]).thresholds["fp32"] == 3.0

    data = json.loads((export_copy / MANIFEST_FILE).read_text())
    del data["tasks"][0]["threshold_history"][0]["reason"]
    data.pop("signature")  # unsigned, and no longer marked as signed once: only the schema is left to refuse it
    (export_copy / MANIFEST_FILE).write_text(json.dumps(data))
    (export_copy / SIGNED_MARKER).unlink()
    with pytest.raises(ManifestError, match=r"threshold_history\[0\]: reason is missing"):
        load_manifest(export_copy)
