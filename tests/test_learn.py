"""`moleflow-edge learn`: a product from a folder of frames into a 2-task model and its export, and the
good-frame rules it shares with `calibrate --source` (unreadable frames skipped, repeats refused)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from moleflow_edge.cli import app
from moleflow_edge.contract import load_manifest
from moleflow_edge.data.synth import generate
from moleflow_edge.good_frames import FrameSourceError, take_good_frames
from moleflow_edge.preprocess import read_image_bgr
from moleflow_edge.runtime import Runtime, RuntimeOptions
from tests.export_fixture import TASKS

NEW = "screw"


def _frames_folder(root: Path, count: int) -> Path:
    """``count`` distinct good frames of a new synthetic product, plus a JPEG round trip of one of them (a
    repeat) and a file that is no image (unreadable), both in the middle of the sorted names."""
    generate(root / "synth", [NEW], seed=2, image_size=128, n_train=count, n_test_good=6, n_test_defect=1)
    frames = root / "frames"
    shutil.copytree(root / "synth" / NEW / "train" / "good", frames)
    ok, jpeg = cv2.imencode(".jpg", cv2.imread(str(frames / "003.png")), [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    cv2.imwrite(str(frames / "003b.png"), cv2.imdecode(jpeg, cv2.IMREAD_COLOR))
    (frames / "005b.png").write_bytes(b"not an image")
    return frames


def test_good_frames_skip_unreadable_and_refuse_repeats(tmp_path: Path) -> None:
    frames = _frames_folder(tmp_path, 8)
    taken = take_good_frames(str(frames), wanted=20, at_least=5)
    assert len(taken.frames) == 8 and taken.read == 10 and taken.repeats == 1
    assert [Path(n).name for n in taken.unreadable] == ["005b.png"]
    assert "003b.png" not in {Path(n).name for n in taken.names}
    ended = r"10 frames read, 8/20 frames \(1 unreadable, 1 repeats refused\); need at least 9.*source ended"
    with pytest.raises(FrameSourceError, match=ended):
        take_good_frames(str(frames), wanted=20, at_least=9)


def test_a_stalled_video_is_refused_not_waited_for(tmp_path: Path) -> None:
    video = tmp_path / "stalled.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (128, 128))
    moving = [np.full((128, 128, 3), 40 * i, np.uint8) for i in range(3)]
    for frame in [*moving, *[moving[-1]] * 120]:  # three distinct frames, then the last one repeated
        writer.write(frame)
    writer.release()
    with pytest.raises(FrameSourceError, match=r"3/10 frames \(0 unreadable, 97 repeats.*stalled stream"):
        take_good_frames(str(video), wanted=10, at_least=5)  # gives up after 100 reads, not 123


def _listed(export: Path, tasks: list[str]) -> dict[str, bytes]:
    """The bytes of every file the manifest lists for ``tasks`` and the backbone."""
    manifest = load_manifest(export)
    artifacts = [*manifest.backbone_graphs.values(), *(a for t in tasks for a in manifest.task(t).graphs.values())]
    return {name: (export / name).read_bytes() for a in artifacts for name, _ in a.paths()}


def test_learn_adds_a_calibrated_task_and_leaves_earlier_ones_bit_identical(built: dict, tmp_path: Path) -> None:
    from moleflow_edge.train import train_task

    model, export, reference = tmp_path / "model", tmp_path / "export", tmp_path / "reference_model"
    for source, target in ((built["model_dir"], model), (built["export_dir"], export), (built["model_dir"], reference)):
        shutil.copytree(source, target)
    frames = _frames_folder(tmp_path, 21)
    before, weights = _listed(export, TASKS), {t: (model / "tasks" / f"{t}.safetensors").read_bytes() for t in TASKS}

    args = ["learn", "--source", str(frames), "--task", NEW, "--model", str(model), "--export", str(export),
            "--detector", "memory", "--frames", "21", "--target-fpr", "0.1", "--threads", "1"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "21/21 frames (1 unreadable, 1 repeats refused)" in result.output

    manifest = load_manifest(export)
    assert manifest.task_names == [*TASKS, NEW]
    assert _listed(export, TASKS) == before  # same names, same bytes
    assert {t: (model / "tasks" / f"{t}.safetensors").read_bytes() for t in TASKS} == weights
    entry = manifest.task(NEW)
    record = entry.calibrations["fp32"]
    assert entry.detector == "memory" and "fp32" in entry.thresholds
    assert (record.source, record.n, record.frames_taken, record.frames_held_out) == (str(frames), 7, 21, 7)
    assert (record.frames_unreadable, record.frames_repeated) == (1, 1)
    assert [h.value for h in entry.threshold_history] == [entry.thresholds["fp32"]]
    assert "held out from training" in entry.threshold_history[0].reason

    dataset = model / "learned" / NEW
    assert len(list((dataset / "train" / "good").glob("*.png"))) == 14
    assert len(list((dataset / "calib" / "good").glob("*.png"))) == 7
    assert json.loads((dataset / "source.json").read_text())["frames_taken"] == 21

    # the task equals `train` on the same frames, bit for bit
    train_task(model / "learned", NEW, reference, detector="memory", progress=False)
    task_file = Path("tasks") / f"{NEW}.safetensors"
    assert (reference / task_file).read_bytes() == (model / task_file).read_bytes()

    with Runtime.load(export, RuntimeOptions("onnxruntime")) as runtime:  # the export serves the new product
        good = sorted((tmp_path / "synth" / NEW / "test" / "good").glob("*.png"))
        results = runtime.infer([read_image_bgr(f) for f in good], with_maps=False)
    assert [r.task for r in results] == [NEW] * len(good)
    assert all(r.is_anomaly is not None for r in results)

    again = CliRunner().invoke(app, args)  # a second learn of the same name: refused before any frame is read
    assert again.exit_code == 2 and "already trained" in again.output and "frames:" not in again.output
