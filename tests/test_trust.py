"""Exports and model folders a line PC can trust: containment, signatures, schema, crash-proof
commit (real SIGKILLs), file modes, locks, checked options and outputs, honest bench, calibration
on real-size data, bounded anomaly maps.

Uses the session's shared small export (tests/export_fixture.py), copied before any change.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cv2
import pytest
from typer.testing import CliRunner

from moleflow_edge.atomic import OutputError, check_writable, write_text_atomic
from moleflow_edge.calibration import CalibrationError, calibrate
from moleflow_edge.cli import app
from moleflow_edge.contract import MANIFEST_FILE, ManifestError, content_name, file_sha256, load_manifest, save_manifest
from moleflow_edge.locking import FolderLock, FolderLocked
from moleflow_edge.preprocess import read_image_bgr
from moleflow_edge.runtime import (
    BackendError,
    RunOptions,
    RunOutcome,
    Runtime,
    RuntimeOptions,
    render_overlay,
    run_source,
)
from moleflow_edge.signing import SIGNED_MARKER, generate_keypair, key_id, load_private_key, load_public_keys, signed_by
from tests.export_fixture import TASKS, normal_subset

REPO = Path(__file__).resolve().parents[1]


def _edit_manifest(export_dir: Path, change: object) -> None:
    """Apply ``change`` to the manifest's JSON dict and write it back, hashes untouched."""
    data = json.loads((export_dir / MANIFEST_FILE).read_text())
    change(data)  # type: ignore[operator]
    (export_dir / MANIFEST_FILE).write_text(json.dumps(data))


def _run(
    export_dir: Path, source: Path, *, check: bool = False, save_dir: Path | None = None, **loading: object
) -> tuple[RunOutcome, str, str]:
    """``run`` on the onnxruntime target; ``loading``: RuntimeOptions fields."""
    out, err = io.StringIO(), io.StringIO()
    options = RunOptions(export_dir, RuntimeOptions("onnxruntime", **loading), save_dir=save_dir, check=check)  # type: ignore[arg-type]
    code = run_source(str(source), options, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


# --- 1. containment ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "entry",
    [
        "../../../../etc/passwd",
        "/etc/passwd",
        "flow/../../outside.onnx",
        "./flow/x.onnx",
        "flow//x.onnx",
        "flow\\..\\x.onnx",
        "C:/x.onnx",
        "symlink",
    ],
)
def test_a_path_outside_the_export_is_refused_naming_the_entry(export_copy: Path, tmp_path: Path, entry: str) -> None:
    outside = tmp_path / "outside.onnx"
    task = load_manifest(export_copy).task(TASKS[0])
    shutil.copy(export_copy / task.graphs["fp32"].file, outside)  # a real graph that would run
    if entry == "symlink":
        entry = "detectors/link.onnx"
        (export_copy / entry).symlink_to(outside)
    sha = file_sha256(outside)

    def point(data: dict) -> None:
        graph = data["tasks"][0]["graphs"]["fp32"]
        graph["file"], graph["sha256"] = entry, sha

    _edit_manifest(export_copy, point)
    with pytest.raises(ManifestError, match="refused") as caught:
        Runtime.load(export_copy, RuntimeOptions("onnxruntime"))
    assert repr(entry) in str(caught.value)


# --- 2. signatures ----------------------------------------------------------------------------------
def test_signed_exports_good_bad_and_missing(export_copy: Path, tmp_path: Path) -> None:
    key, public = generate_keypair(tmp_path / "keys" / "line.key")
    _, stranger = generate_keypair(tmp_path / "keys" / "other.key")
    assert (key.stat().st_mode & 0o777) == 0o600  # the private key is for its owner only
    with Runtime.load(export_copy, RuntimeOptions("onnxruntime")) as runtime:  # unsigned, no key configured: works
        assert runtime.tasks == TASKS
    with pytest.raises(ManifestError, match="not signed"):
        Runtime.load(export_copy, RuntimeOptions("onnxruntime", trusted_keys=[public]))
    save_manifest(export_copy, load_manifest(export_copy), load_private_key(key))
    with Runtime.load(export_copy, RuntimeOptions("onnxruntime", trusted_keys=[public])) as runtime:
        assert runtime.tasks == TASKS
    with pytest.raises(ManifestError, match="does not verify with any trusted key"):
        Runtime.load(export_copy, RuntimeOptions("onnxruntime", trusted_keys=[stranger]))

    def tamper(data: dict) -> None:  # a graph swapped together with its hash: the sha256 list cannot see it
        data["tasks"][0]["thresholds"] = {"fp32": 1e9}

    _edit_manifest(export_copy, tamper)
    load_manifest(export_copy)  # hashes still match
    with pytest.raises(ManifestError, match="changed after signing"):
        load_manifest(export_copy, trusted_keys=load_public_keys([public]))
    code, _, err = _run(export_copy, tmp_path, trusted_keys=[public])
    assert code is RunOutcome.LOAD_FAILED and "changed after signing" in err
    with pytest.raises(ValueError, match="already exists"):
        generate_keypair(key)  # a key is never overwritten


def _swap_in_place(export_dir: Path) -> tuple[str, bytes]:
    """The probe: task 0's fp32 graph file overwritten with task 1's, its sha256 updated in the
    manifest, its name kept. Returns that file's name and its genuine bytes."""
    manifest = load_manifest(export_dir)
    name = manifest.task(TASKS[0]).graphs["fp32"].file
    genuine = (export_dir / name).read_bytes()
    shutil.copy(export_dir / manifest.task(TASKS[1]).graphs["fp32"].file, export_dir / name)
    sha = file_sha256(export_dir / name)
    _edit_manifest(export_dir, lambda data: data["tasks"][0]["graphs"]["fp32"].update(sha256=sha))
    return name, genuine


@pytest.mark.parametrize("marker_deleted", [False, True], ids=["stripped", "stripped-and-marker-deleted"])
def test_a_stripped_signature_is_rebuilt_from_the_model_never_signed_again(
    built: dict, export_copy: Path, tmp_path: Path, marker_deleted: bool
) -> None:
    """The probe: a signed export, one graph swapped for another task's with its sha256 updated, the
    signature deleted (and, the second time, the signers' marker too); then signing it again."""
    from moleflow_edge.export.exporter import export_model

    key, public = generate_keypair(tmp_path / "build.key")
    save_manifest(export_copy, load_manifest(export_copy), load_private_key(key))
    assert signed_by(export_copy) == [key_id(load_private_key(key).public_key())]
    with pytest.raises(ManifestError, match="is signed: pass --sign"):  # never rewritten unsigned
        export_model(built["model_dir"], export_copy, trusted_keys=[public])
    name, genuine = _swap_in_place(export_copy)
    _edit_manifest(export_copy, lambda data: data.pop("signature"))
    if marker_deleted:
        (export_copy / SIGNED_MARKER).unlink()
    refusals = {  # treated as tampered with or without trusted keys; without the marker, the name tells
        "none": "content-addressed name" if marker_deleted else "was signed before",
        "trusted": "not signed, and trusted keys are configured" if marker_deleted else "was signed before",
    }
    for keys, refusal in ((None, refusals["none"]), ([public], refusals["trusted"])):
        with pytest.raises(ManifestError, match=refusal):
            Runtime.load(export_copy, RuntimeOptions("onnxruntime", trusted_keys=keys))
    code, _, err = _run(export_copy, tmp_path, trusted_keys=[public])
    assert code is RunOutcome.LOAD_FAILED and refusals["trusted"] in err
    stripped = (export_copy / MANIFEST_FILE).read_bytes()
    runner, model, out = CliRunner(), str(built["model_dir"]), str(export_copy)
    for args in (["calibrate", "--export", out, "--data", str(built["data"])],
                 ["export", "--model", model, "--task", TASKS[0], "--out", out]):  # fmt: skip
        result = runner.invoke(app, [*args, "--sign", str(key)])
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert result.exit_code == 2 and len(errors) == 1 and "Traceback" not in result.output, result.output
        assert f"export --model MODEL --all --out {out} --sign KEY" in errors[0]
    assert (export_copy / MANIFEST_FILE).read_bytes() == stripped  # nothing signed, nothing written
    result = runner.invoke(app, ["export", "--model", model, "--all", "--out", out, "--sign", str(key)])
    assert result.exit_code == 0, result.output
    assert "up to date" not in result.output and f"warning: {name} did not match" in result.output
    assert "every graph was rebuilt from the model" in result.output
    assert (export_copy / name).read_bytes() == genuine  # the swapped graph rebuilt, same name, genuine bytes
    with Runtime.load(export_copy, RuntimeOptions("onnxruntime", trusted_keys=[public])) as runtime:
        assert runtime.tasks == TASKS and runtime.uncalibrated  # its thresholds were not known good either
    assert load_manifest(export_copy).task(TASKS[0]).graphs["fp32"].sha256 == hashlib.sha256(genuine).hexdigest()


def test_a_file_unlike_its_content_name_is_refused_unsigned(built: dict, export_copy: Path, tmp_path: Path) -> None:
    from moleflow_edge.export.exporter import export_model

    name, genuine = _swap_in_place(export_copy)  # never signed: every sha256 in the manifest matches
    with pytest.raises(ManifestError) as caught:
        Runtime.load(export_copy, RuntimeOptions("onnxruntime"))
    message = str(caught.value)
    assert "\n" not in message and name in message and "content-addressed name" in message
    code, _, err = _run(export_copy, tmp_path)
    assert code is RunOutcome.LOAD_FAILED and name in err
    report = export_model(built["model_dir"], export_copy)  # unsigned: the swapped graph is rebuilt, not reused
    assert report.rebuilt == [name] and (export_copy / name).read_bytes() == genuine
    with Runtime.load(export_copy, RuntimeOptions("onnxruntime")) as runtime:
        assert runtime.tasks == TASKS


# --- 3. schema and graphs that cannot load ----------------------------------------------------------
def test_schema_errors_are_listed_one_per_line_and_run_exits_1(export_copy: Path, built: dict) -> None:
    def break_it(data: dict) -> None:
        data["image_size"] = -5
        data["tasks"][0]["threshold"] = "abc"
        data["tasks"][1]["distance_limit"] = float("nan")
        data["backbone_graphs"]["fp32"]["sha256"] = "xyz"
        del data["grid"]
        data["surprise"] = 1

    _edit_manifest(export_copy, break_it)
    with pytest.raises(ManifestError) as caught:
        load_manifest(export_copy)
    lines = str(caught.value).splitlines()
    assert "6 problem(s)" in lines[0] and len(lines) == 7
    for expected in ("image_size", "threshold", "distance_limit", "sha256", "grid is missing", "surprise"):
        assert any(expected in line for line in lines[1:]), expected
    code, out, err = _run(export_copy, built["data"] / TASKS[0] / "test" / "good")
    assert code is RunOutcome.LOAD_FAILED and "image_size" in err and "Traceback" not in err
    _edit_manifest(export_copy, lambda data: data.update(format_version=99))
    with pytest.raises(ManifestError, match="format version 99"):
        load_manifest(export_copy)


def test_a_graph_that_cannot_load_fails_run_and_check(export_copy: Path, built: dict) -> None:
    broken = export_copy / content_name(f"detectors/{TASKS[1]}.fp32.onnx", hashlib.sha256(b"not a graph").hexdigest())
    broken.write_bytes(b"not a graph")  # under its own content name, so that only loading it can fail
    _edit_manifest(export_copy, lambda data: data["tasks"][1]["graphs"]["fp32"].update(
        file=broken.relative_to(export_copy).as_posix(), sha256=file_sha256(broken)))  # fmt: skip
    frames = built["data"] / TASKS[1] / "test" / "good"
    code, out, err = _run(export_copy, frames)
    assert (
        code is RunOutcome.ENGINE_FAILED and "detector graphs failed" in err
    )  # frames ran, but the export is not healthy
    assert json.loads(out.splitlines()[-1])["summary"]["failed_tasks"].keys() == {TASKS[1]}
    code, out, err = _run(export_copy, frames, check=True)
    assert code is RunOutcome.ENGINE_FAILED and TASKS[1] in err
    assert len(out.splitlines()) == 1  # only the summary: no frame ran
    with pytest.raises(BackendError, match=TASKS[1]):
        Runtime.load(export_copy, RuntimeOptions("onnxruntime")).check_graphs()


# --- 4. crash-proof commit: a real SIGKILL at every step ------------------------------------------------
KILLER = textwrap.dedent(
    """
    import os, shutil, signal, sys
    os.umask(0o002)
    from moleflow_edge.export import commit, exporter
    kill_at, armed, count = int(sys.argv[3]), [False], [0]

    def step(real):
        def wrapped(*args, **kwargs):
            if armed[0]:
                count[0] += 1
                if count[0] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        return wrapped

    for name in ("replace", "unlink", "rmdir"):
        setattr(os, name, step(getattr(os, name)))
    real_commit = commit.commit_export

    def commit_armed(*args, **kwargs):
        armed[0] = True
        return real_commit(*args, **kwargs)

    commit.commit_export = commit_armed
    exporter.export_model(sys.argv[1], sys.argv[2], precisions=("fp32", "fp16"))
    print("steps", count[0])
    """
)


def _export_in_subprocess(model_dir: Path, out: Path, kill_at: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", KILLER, str(model_dir), str(out), str(kill_at)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip


def test_sigkill_at_every_commit_step_leaves_the_old_or_the_new_export(built: dict, tmp_path: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(built["export_dir"], base)
    (base / "detectors" / "orphan.onnx").write_bytes(b"left by an old run")  # swept by the next export
    (base / ".staging-deadbeef0000").mkdir()  # left by a killed run
    old = load_manifest(base)
    dry = tmp_path / "dry"
    shutil.copytree(base, dry)
    finished = _export_in_subprocess(built["model_dir"], dry, 0)
    assert finished.returncode == 0, finished.stderr
    assert "warn" not in finished.stderr.lower(), finished.stderr  # no third-party chatter
    steps = int(finished.stdout.split("steps")[1])
    assert steps >= 5  # moves, the manifest rename, staging removal, the sweep
    new = load_manifest(dry)
    assert "fp16" in new.backbone_graphs and not (dry / "detectors" / "orphan.onnx").exists()
    assert not [p for p in dry.iterdir() if p.name.startswith(".staging-")]
    written = [p for p in dry.rglob("*") if p.is_file() and not (base / p.relative_to(dry)).exists()]
    assert written and (dry / MANIFEST_FILE) in [*written, dry / MANIFEST_FILE]
    for path in [*written, dry / MANIFEST_FILE]:
        assert (path.stat().st_mode & 0o777) == 0o664, path  # the umask decides, not mkstemp
    outcomes = set()
    for kill_at in range(1, steps + 1):
        out = tmp_path / f"kill{kill_at}"
        shutil.copytree(base, out)
        killed = _export_in_subprocess(built["model_dir"], out, kill_at)
        assert killed.returncode == -signal.SIGKILL, (kill_at, killed.stderr)
        manifest = load_manifest(out)  # verifies every listed file: the old or the new export, never neither
        if "fp16" in manifest.backbone_graphs:  # the new export, whole
            assert all("fp16" in t.graphs for t in manifest.tasks), kill_at
            outcomes.add("new")
        else:
            assert manifest.to_json() == old.to_json(), kill_at
            outcomes.add("old")
        with Runtime.load(out, RuntimeOptions("onnxruntime")) as runtime:
            assert runtime.tasks == TASKS
    assert outcomes == {"old", "new"}  # kills before the manifest swap keep the old one, after it the new


# --- 5. file modes -------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_writes_follow_the_umask(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        write_text_atomic(tmp_path / "f.json", "{}")
    finally:
        os.umask(previous)
    assert ((tmp_path / "f.json").stat().st_mode & 0o777) == 0o666 & ~umask


# --- 6. bench times the flow ---------------------------------------------------------------------------
def test_bench_without_data_times_the_flow(built: dict) -> None:
    from moleflow_edge.bench.run import bench

    report = bench(built["export_dir"], ("onnxruntime-cpu",), ("fp32",), (1, 4), iters=3, task_counts=(), printer=None)
    assert report["results"] and "lifted" in report["frames"]
    for row in report["results"]:
        assert row["stages_ms"]["detector"]["p50"] > 0.0, row
        assert "warning" not in row


# --- 7. calibration on real-size data -------------------------------------------------------------------
def test_calibrate_with_ten_normals_uses_the_tightest_supported_rate(
    built: dict, export_copy: Path, tmp_path: Path
) -> None:
    data = normal_subset(built["data"], tmp_path / "data", 10)
    report = calibrate(export_copy, data, target_fpr=0.01)
    manifest = load_manifest(export_copy)
    for row in report.tasks:
        assert row.n == 10 and row.k == 1 and not row.target_met
        assert row.expected_fpr == pytest.approx(1 / 11) and row.fpr_upper95 > row.expected_fpr
        assert manifest.task(row.task).calibrations["fp32"].target_met is False
    assert "0.01 NOT reached" in report.table() and "needs 100 normal images" in report.table()
    with Runtime.load(export_copy, RuntimeOptions("onnxruntime")) as runtime:
        status = runtime.task_status()
    assert all("calibrated on 10 images" in status[t] for t in TASKS)
    for task in TASKS:  # four images give no threshold worth having: refused, the manifest kept
        for extra in sorted((data / task / "test" / "good").glob("*.png"))[4:]:
            extra.unlink()
    before = (export_copy / MANIFEST_FILE).read_bytes()
    with pytest.raises(CalibrationError, match="has 4 normal images; calibration needs at least 5"):
        calibrate(export_copy, data, target_fpr=0.01)
    assert (export_copy / MANIFEST_FILE).read_bytes() == before


def test_run_says_once_up_front_that_tasks_are_uncalibrated(built: dict) -> None:
    code, out, err = _run(built["export_dir"], built["data"] / TASKS[0] / "test" / "good")
    assert code is RunOutcome.DONE and err.count("not calibrated") == 1
    assert err.index("not calibrated") < err.index("moleflow-edge run:")  # before the summary
    assert all(json.loads(out.splitlines()[-1])["summary"]["calibration"][t] == "uncalibrated" for t in TASKS)


# --- 8. locks, options, outputs -------------------------------------------------------------------------
def test_a_second_writer_is_refused_naming_the_holder(built: dict, tmp_path: Path) -> None:
    from moleflow_edge.export.exporter import export_model
    from moleflow_edge.train import train_task
    from tests.conftest import TINY_CONFIG

    model_dir, out = tmp_path / "model", tmp_path / "export"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from moleflow_edge.locking import FolderLock\n"
         "with FolderLock(sys.argv[1], 'training'), FolderLock(sys.argv[2], 'export'):\n"
         "    print('held', flush=True); time.sleep(120)", str(model_dir), str(out)],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderLocked, match=rf"pid {holder.pid}\b.*training refused"):
            train_task(built["data"], TASKS[0], model_dir, TINY_CONFIG, 1, progress=False)
        assert sorted(p.name for p in model_dir.iterdir()) == [".lock"]  # nothing trained, nothing written
        with pytest.raises(FolderLocked, match=rf"pid {holder.pid}\b.*export refused"):
            export_model(built["model_dir"], out)
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock, no stale lock file blocks the next run
        holder.wait()
    with FolderLock(model_dir, "training"):
        pass


def test_bad_numbers_and_unwritable_outputs_are_refused_before_work(built: dict, tmp_path: Path) -> None:
    from moleflow_edge.train import train_task

    in_the_way = tmp_path / "a_file"
    in_the_way.write_text("x")
    with pytest.raises(ValueError, match="must be >= 1, got -3: nothing was trained"):
        train_task(built["data"], TASKS[0], tmp_path / "model", None, -3, progress=False)
    assert not (tmp_path / "model" / "tasks.json").exists()
    runner = CliRunner()
    export = str(built["export_dir"])
    cases = [
        (["run", "--export", export, "--source", str(tmp_path), "--batch-size", "0"], "--batch-size"),
        (["run", "--export", export, "--source", str(tmp_path), "--map-size", "0"], "--map-size"),
        (["bench", "--export", export, "--batch", "1,0"], "--batch takes"),
        (["bench", "--export", export, "--iters", "0"], "--iters"),
        (["bench", "--export", export, "--json", str(in_the_way / "x.json")], "is a file"),
        (
            ["eval", "--data", str(built["data"]), "--model", str(built["model_dir"]), "--json", str(tmp_path)],
            "is not a file",
        ),
        (["export", "--model", str(built["model_dir"]), "--all", "--out", str(in_the_way)], "not a folder"),
        (["train", "--data", str(built["data"]), "--task", TASKS[0], "--model", str(in_the_way / "m")], "is a file"),
        (["run", "--export", export, "--source", str(tmp_path), "--save", str(in_the_way / "s")], "is a file"),
    ]
    for args, expected in cases:
        started = time.perf_counter()
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert expected in result.output and "Traceback" not in result.output, (args, result.output)
        assert time.perf_counter() - started < 30, args  # refused before the work, not after
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_writable(in_the_way / "deeper" / "out.json", "--json", directory=False)


# --- 9. bounded anomaly maps ----------------------------------------------------------------------------
def test_a_huge_frame_gets_a_capped_map(built: dict) -> None:
    frame = read_image_bgr(sorted((built["data"] / TASKS[0] / "test" / "good").glob("*.png"))[0])
    huge = cv2.resize(frame, (3200, 5120), interpolation=cv2.INTER_LINEAR)
    with Runtime.load(built["export_dir"], RuntimeOptions("onnxruntime")) as runtime:
        result = runtime.infer_one(huge)
        assert result.error is None and result.anomaly_map is not None
        assert result.anomaly_map.shape == (2048, 1280)  # longest side capped, aspect kept
        assert render_overlay(huge, result).shape == huge.shape  # the overlay still covers the frame
        runtime.max_map_side = None
        assert runtime.infer_one(frame).anomaly_map.shape == frame.shape[:2]
