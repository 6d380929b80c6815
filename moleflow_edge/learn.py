"""`moleflow-edge learn`: add a product to a running line from its camera, video or folder.

One command does what took five by hand: take good frames from the source (good_frames.py:
unreadable frames skipped, repeats of a stalled stream refused), split them in time order (the
last third held out, so the threshold is judged on frames the task never saw and that came
later, as the line's will), keep them as an MVTec-layout dataset beside the model for audit,

    MODEL/learned/<task>/train/good/0000.png ...   the frames the task was trained on
    MODEL/learned/<task>/calib/good/0000.png ...   the held-out frames its threshold comes from
    MODEL/learned/<task>/source.json               where they came from, what was refused, when

train the task (train.train_task on that folder, so `train --data MODEL/learned --task T` gives
the same task file bit for bit), export it incrementally into the export the line runs
(export_model: earlier tasks' files reused untouched, one atomic commit), and calibrate its
threshold on the held-out frames (calibration.calibrate: a second commit). Frames are written
as PNG, losslessly: the camera's codec and light stay in them.

Crash safety is the pieces': the model gains the task only once it is trained, the export only
at its commit, so a crash leaves the old export serving; a rerun after a crash past training
is refused (the task is trained) and says how to finish with `export` and `calibrate --source`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2

from moleflow_edge.atomic import check_writable
from moleflow_edge.calibration.manifest_update import now_utc
from moleflow_edge.calibration.thresholds import NormalFrames, TaskCalibration, calibrate
from moleflow_edge.contract import MANIFEST_FILE, Precision, load_manifest
from moleflow_edge.data.mvtec import GOOD
from moleflow_edge.errors import InputError
from moleflow_edge.export.artifacts import ExportReport
from moleflow_edge.export.exporter import export_model
from moleflow_edge.good_frames import GoodFrames, take_good_frames
from moleflow_edge.learn_options import HOLD_OUT_EVERY, LEARNED_DIR, LearnOptions
from moleflow_edge.locking import FolderLock
from moleflow_edge.model.continual_model import check_task_name
from moleflow_edge.model_store import ModelDirError, ModelStore
from moleflow_edge.signing import load_private_key, load_public_keys
from moleflow_edge.targets import check_export_args
from moleflow_edge.train import TrainReport, train_task


@dataclass
class LearnReport:
    """What `learn` took, trained, exported and calibrated, and the seconds per stage."""

    task: str
    frames: GoodFrames
    audit_dir: Path
    trained: TrainReport
    exported: ExportReport
    calibration: TaskCalibration
    seconds: dict[str, float] = field(default_factory=dict)  # read, train, export, calibrate, total
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        s, c = self.seconds, self.calibration
        stages = ", ".join(f"{k} {v:.1f}" for k, v in s.items() if k != "total")
        written = ", ".join(f.file for f in self.exported.written) or "nothing new"
        return "\n".join([
            f"learned {self.task} ({self.trained.detector.value}) from {self.frames.source}: "
            f"{self.frames.progress()}, dataset kept in {self.audit_dir}",
            f"trained on {self.trained.images} frames: {self.trained.summary}",
            f"exported into {self.exported.out_dir}: {written} (earlier tasks untouched)",
            f"threshold {c.threshold:.4g} at E[FPR] {c.expected_fpr:.3g} from {c.n} held-out frames; "
            f"unknown-product limit {c.distance_limit:.4g}",
            f"done in {s['total']:.1f} s ({stages} s)",
            *self.notes,
        ])  # fmt: skip


def _check_before_reading(task: str, model_dir: Path, export_dir: Path, options: LearnOptions) -> list[str]:
    """Every refusal that can be found before frames are read and a task trained; the notes to give."""
    check_task_name(task)
    if Precision.INT8 in check_export_args("onnx", options.precisions)[1]:
        raise InputError(
            "learn exports fp32 or fp16: int8 graphs need calibration images for the backbone; add them after learn "
            f"with moleflow-edge export --model {model_dir} --task {task} --precision int8 --calib-data ROOT"
        )
    trained = ModelStore(model_dir).tasks()
    if task in trained:
        raise ModelDirError(
            f"task {task!r} is already trained in {model_dir}; pick a new name (if a learn stopped after training, "
            f"finish it: export --task {task}, then calibrate --source "
            f"{model_dir / LEARNED_DIR / task / 'calib' / GOOD} --task {task})"
        )
    check_writable(model_dir, "--model", directory=True)
    check_writable(export_dir, "--export", directory=True)
    if not (export_dir / MANIFEST_FILE).is_file():
        return []
    key = None if options.sign is None else load_private_key(options.sign)
    keys = load_public_keys(options.trusted_keys) if options.trusted_keys else None
    manifest = load_manifest(export_dir, verify=False, trusted_keys=keys, rewrite=True, signing_key=key)
    if missing := [t for t in manifest.task_names if t not in trained]:
        raise ModelDirError(f"{export_dir} serves tasks {missing} that {model_dir} lacks: it is another model's export")
    served = {p.value for t in manifest.tasks for p in t.graphs} - set(options.precisions)
    return [
        f"note: {task} gets no {p} graph: a line running {p} keeps its old export until {task} is exported at {p} "
        f"too (moleflow-edge export --model {model_dir} --task {task} --precision {p} ...)" for p in sorted(served)
    ]  # fmt: skip


def write_audit_dataset(model_dir: Path, task: str, frames: GoodFrames, held: int) -> Path:
    """MODEL/learned/<task>: train/good and calib/good as PNG, and source.json; written beside, then
    renamed into place (a folder left by a learn that stopped before training is replaced)."""
    final = model_dir / LEARNED_DIR / task
    staging = final.parent / f".{task}.{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    split = {"train": frames.frames[: len(frames.frames) - held], "calib": frames.frames[len(frames.frames) - held :]}
    for part, images in split.items():
        folder = staging / part / GOOD
        folder.mkdir(parents=True)
        for i, image in enumerate(images):
            ok, data = cv2.imencode(".png", image)
            if not ok:
                raise OSError(f"cannot encode frame {i} of {frames.source} as PNG")
            data.tofile(str(folder / f"{i:04d}.png"))
    about = {"source": frames.source, "time": now_utc(), **frames.record(), "frames_held_out": held,
             "taken_from": frames.names, "unreadable": frames.unreadable}  # fmt: skip
    (staging / "source.json").write_text(json.dumps(about, indent=2) + "\n")
    with FolderLock(model_dir, "learning"):  # no training may read a half-replaced folder
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
    return final


def learn(
    source: str,
    task: str,
    model_dir: str | Path,
    export_dir: str | Path,
    options: LearnOptions | None = None,
    progress: Callable[[GoodFrames], None] | None = None,
    say: Callable[[str], None] | None = None,
) -> LearnReport:
    """Take ``options.frames`` good frames of ``source``, learn them as ``task`` into ``model_dir``,
    export it into ``export_dir`` and calibrate it on the held-out frames (module docstring).

    Args:
        source: a folder, video file, ``camera:N`` or stream URL, as ``run`` reads them.
        task: the product's name, new to the model directory.
        model_dir: the model directory the task is trained into.
        export_dir: the export the line runs; the task is added incrementally and calibrated.
        options: frames, detector kind, target rate, precision, signing and device (LearnOptions;
            None: the defaults).
        progress: hears of every frame taken.
        say: hears of every stage begun.

    Returns:
        The frames taken, the audit folder, the training, export and calibration reports, and
        the seconds per stage.
    """
    model, export = Path(model_dir), Path(export_dir)
    options = options or LearnOptions()
    tell = say or (lambda _: None)
    started = time.perf_counter()
    notes = _check_before_reading(task, model, export, options)
    seconds: dict[str, float] = {}

    def stage(name: str, since: float) -> float:
        now = time.perf_counter()
        seconds[name] = now - since
        return now

    frames = take_good_frames(source, options.frames, options.least_frames, progress)
    held = len(frames.frames) // HOLD_OUT_EVERY
    audit = write_audit_dataset(model, task, frames, held)
    mark = stage("read", started)
    tell(f"training {task} on {len(frames.frames) - held} frames ({held} held out)")
    trained = train_task(audit.parent, task, model, detector=options.detector, progress=False, device=options.device)
    mark = stage("train", mark)
    tell(f"exporting {task} into {export}")
    served = load_manifest(export, verify=False).task_names if (export / MANIFEST_FILE).is_file() else []
    exported = export_model(model, export, [*served, task], options.precisions, sign=options.sign,
                            trusted_keys=options.trusted_keys)  # fmt: skip
    mark = stage("export", mark)
    tell(f"calibrating {task} on its {held} held-out frames")
    record = {**frames.record(), "frames_held_out": held, "dataset": str(audit / "calib" / GOOD)}
    normal = {task: NormalFrames(frames.frames[len(frames.frames) - held :], frames.source, record)}
    rows = [  # one commit per precision; the first one's is reported
        calibrate(export, None, options.target_fpr, precision=precision, tasks=[task], sign=options.sign,
                  trusted_keys=list(options.trusted_keys), frames=normal,
                  reason="learn, on frames held out from training").tasks[0]
        for precision in options.precisions
    ]  # fmt: skip
    stage("calibrate", mark)
    seconds["total"] = time.perf_counter() - started
    return LearnReport(task, frames, audit, trained, exported, rows[0], seconds, notes)
