"""A line that runs all year (issue 25, items 1-4): a tampered export is never signed again or reused,
nothing follows a symlink out of the toolkit's folders, every written file has its documented mode,
and outputs are checked, created and never lost.

Uses the session's shared small export (tests/export_fixture.py), copied before any change, and one
fresh one-step training written under umask 002 (``fresh``), whose files every mode test walks.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moleflow_edge.atomic import OutputError
from moleflow_edge.calibration import calibrate
from moleflow_edge.cli import app
from moleflow_edge.contract import MANIFEST_FILE, ManifestError, load_manifest, save_manifest
from moleflow_edge.export.commit import sweep
from moleflow_edge.locking import FolderLock
from moleflow_edge.runtime import RunOutcome, Runtime, RuntimeOptions
from moleflow_edge.signing import generate_keypair, load_private_key
from tests.export_fixture import TASKS, normal_subset
from tests.test_trust import _edit_manifest

UMASK = 0o002  # differs from the usual 022 and from mkstemp's 0600, so each would show
FILE_MODE = 0o666 & ~UMASK


def _files(*roots: Path) -> list[Path]:
    return sorted(p for root in roots for p in root.rglob("*") if p.is_file())


# --- 1. a tampered export is never signed again, and never reused -------------------------------------
def _swap_graphs(data: dict) -> None:
    """The probe: task 0's graph entry pointed at task 1's graph, its hash updated to match."""
    data["tasks"][0]["graphs"]["fp32"] = data["tasks"][1]["graphs"]["fp32"]


def test_a_tampered_signed_export_is_never_signed_again(built: dict, export_copy: Path, tmp_path: Path) -> None:
    from moleflow_edge.export.exporter import export_model

    key, public = generate_keypair(tmp_path / "build.key")
    save_manifest(export_copy, load_manifest(export_copy), load_private_key(key))
    genuine = {p.name: p.read_bytes() for p in _files(export_copy)}
    _edit_manifest(export_copy, _swap_graphs)
    load_manifest(export_copy)  # every hash matches: only the signature can tell
    tampered = (export_copy / MANIFEST_FILE).read_bytes()
    with pytest.raises(ManifestError, match="changed after signing"):
        calibrate(export_copy, built["data"], target_fpr=0.1, sign=key)
    with pytest.raises(ManifestError, match="changed after signing"):
        export_model(built["model_dir"], export_copy, sign=key)
    with pytest.raises(ManifestError, match="is signed: pass --sign"):  # nothing to check the signature with
        export_model(built["model_dir"], export_copy)
    result = CliRunner().invoke(app, ["calibrate", "--export", str(export_copy), "--data", str(built["data"]),
                                      "--sign", str(key), "--trusted-key", str(public)])  # fmt: skip
    assert result.exit_code == 2 and "changed after signing" in result.output and "Traceback" not in result.output
    assert (export_copy / MANIFEST_FILE).read_bytes() == tampered  # not signed again
    for path in _files(export_copy):  # the genuine graph of task 0 was neither reused nor deleted
        assert path.name in (MANIFEST_FILE, ".lock") or path.read_bytes() == genuine[path.name], path


def test_a_signed_export_is_signed_again_when_it_verifies(built: dict, export_copy: Path, tmp_path: Path) -> None:
    key, public = generate_keypair(tmp_path / "build.key")
    save_manifest(export_copy, load_manifest(export_copy), load_private_key(key))
    calibrate(export_copy, normal_subset(built["data"], tmp_path / "data", 10), target_fpr=0.1, sign=key)
    with Runtime.load(export_copy, RuntimeOptions("onnxruntime", trusted_keys=[public])) as runtime:
        assert not runtime.uncalibrated


def test_a_damaged_file_is_rebuilt_not_reused_and_the_user_is_told(built: dict, export_copy: Path) -> None:
    from moleflow_edge.export.exporter import export_model

    graph = load_manifest(export_copy).task(TASKS[0]).graphs["fp32"].file
    genuine = (export_copy / graph).read_bytes()
    (export_copy / graph).write_bytes(genuine[:-7] + b"damaged")  # the manifest's hash no longer matches
    report = export_model(built["model_dir"], export_copy)
    assert report.rebuilt == [graph] and f"warning: {graph} did not match its sha256" in report.table()
    assert (export_copy / graph).read_bytes() == genuine  # rebuilt from the model, same bytes
    load_manifest(export_copy)  # every hash verifies again


# --- 2. nothing follows a symlink out of the toolkit's folders ----------------------------------------
def test_a_symlinked_detectors_folder_is_refused_and_nothing_outside_changes(built: dict, tmp_path: Path) -> None:
    from moleflow_edge.export.exporter import export_model

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.onnx").write_bytes(b"someone else's file")
    out = tmp_path / "export"
    out.mkdir()
    (out / "detectors").symlink_to(outside, target_is_directory=True)
    with pytest.raises(OutputError, match=r"detectors is a symbolic link; export refused"):
        export_model(built["model_dir"], out)
    assert [p.name for p in outside.iterdir()] == ["precious.onnx"]
    model = tmp_path / "model"
    model.mkdir()
    (model / "tasks").symlink_to(outside, target_is_directory=True)
    with pytest.raises(OutputError, match=r"tasks is a symbolic link; training refused"):
        from moleflow_edge.train import train_task

        train_task(built["data"], TASKS[0], model, steps=1, progress=False)
    assert [p.name for p in outside.iterdir()] == ["precious.onnx"]


def test_the_sweep_never_deletes_through_a_symlinked_folder(export_copy: Path, tmp_path: Path) -> None:
    manifest = load_manifest(export_copy)
    moved = tmp_path / "moved_detectors"
    shutil.move(export_copy / "detectors", moved)
    (moved / "precious.onnx").write_bytes(b"not listed, and not the export's to delete")
    (export_copy / "detectors").symlink_to(moved, target_is_directory=True)
    (export_copy / "backbone.stale.onnx").write_bytes(b"unlisted, the exporter's own")
    removed = sweep(export_copy, manifest)
    assert removed == ["backbone.stale.onnx"] and (moved / "precious.onnx").exists()


def test_a_symlinked_lock_file_is_refused_and_its_target_untouched(built: dict, tmp_path: Path) -> None:
    from moleflow_edge.export.exporter import export_model

    victim = tmp_path / "victim.conf"
    victim.write_text("a file the lock must never truncate\n")
    out = tmp_path / "export"
    out.mkdir()
    (out / ".lock").symlink_to(victim)
    with pytest.raises(OutputError, match=r"\.lock is a symbolic link: export refused"):
        export_model(built["model_dir"], out)
    with pytest.raises(OutputError, match="symbolic link: calibration refused"):
        with FolderLock(out, "calibration"):
            pass
    assert victim.read_text() == "a file the lock must never truncate\n"


# --- 3. file modes, 4. outputs: one fresh training and export under umask 002 ---------------------------
@pytest.fixture(scope="module")
def fresh(built: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A one-step training (over temporary files a killed save left), a signed export, keys, a run's
    overlays and the outputs of synth, bench and eval into new folders, all under umask 002."""
    from moleflow_edge.export.exporter import export_model
    from moleflow_edge.runtime import RunOptions, run_source
    from moleflow_edge.train import train_task
    from tests.conftest import TINY_CONFIG

    base = tmp_path_factory.mktemp("fresh")
    model, export, keys, outputs = base / "model", base / "export", base / "keys", base / "new" / "deeper"
    stale = [model / ".tasks.json.k1ll3d.tmp", model / "tasks" / f".{TASKS[0]}.safetensors.k1ll3d.tmp"]
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half a save")
    previous = os.umask(UMASK)
    try:
        train_task(built["data"], TASKS[0], model, TINY_CONFIG, steps=1, progress=False)
        key, _ = generate_keypair(keys / "build.key")
        export_model(model, export, sign=key)
        frames = built["data"] / TASKS[0] / "test" / "good"
        options = RunOptions(export, RuntimeOptions("onnxruntime"), save_dir=outputs / "maps")
        code = run_source(str(sorted(frames.glob("*.png"))[0]), options, out=io.StringIO(), err=io.StringIO())
        runner = CliRunner()
        cli = {
            "synth": runner.invoke(app, ["synth", "--out", str(outputs / "synth"), "--categories", "cap",
                                         "--image-size", "32", "--n-train", "2", "--n-test-good", "1",
                                         "--n-test-defect", "1"]),
            "bench": runner.invoke(app, ["bench", "--export", str(export), "--backends", "onnxruntime-cpu",
                                         "--precisions", "fp32", "--batch", "1", "--iters", "1",
                                         "--json", str(outputs / "bench" / "bench.json")]),
            "eval": runner.invoke(app, ["eval", "--data", str(built["data"]), "--model", str(model), "--device", "cpu",
                                        "--json", str(outputs / "eval" / "eval.json")]),
        }  # fmt: skip
    finally:
        os.umask(previous)
    return {"model": model, "export": export, "keys": keys, "outputs": outputs, "stale": stale, "run": code,
            "cli": cli, "key": key}  # fmt: skip


def test_every_written_file_has_its_documented_mode(fresh: dict) -> None:
    written = _files(fresh["model"], fresh["export"], fresh["keys"], fresh["outputs"])
    kinds = {p.suffix or p.name for p in written}
    assert {".safetensors", ".json", ".onnx", ".lock", ".key", ".pub", ".png"} <= kinds
    for path in written:
        expected = 0o600 if path == fresh["key"] else FILE_MODE  # the private key is its owner's alone
        assert (path.stat().st_mode & 0o777) == expected, (path, oct(path.stat().st_mode & 0o777))


def test_outputs_in_a_new_folder_are_written(fresh: dict) -> None:
    assert fresh["run"] is RunOutcome.DONE and len(list((fresh["outputs"] / "maps").glob("*.png"))) == 1
    for command, result in fresh["cli"].items():
        assert result.exit_code == 0, (command, result.output)
    assert (fresh["outputs"] / "synth" / "cap" / "train" / "good").is_dir()
    assert json.loads((fresh["outputs"] / "bench" / "bench.json").read_text())["results"]
    assert TASKS[0] in json.loads((fresh["outputs"] / "eval" / "eval.json").read_text())["tasks"]


def test_a_killed_saves_temporary_files_are_swept(fresh: dict) -> None:
    assert not any(path.exists() for path in fresh["stale"])
    assert not [p for p in fresh["model"].rglob("*.tmp")]


@pytest.mark.parametrize("command", ["keygen", "synth"])
@pytest.mark.parametrize("where", ["/proc/moleflow-test", "a_file/below"])
def test_keygen_and_synth_say_in_one_line_that_a_folder_is_unwritable(tmp_path: Path, command: str, where: str) -> None:
    (tmp_path / "a_file").write_text("in the way")
    target = Path(where) if where.startswith("/") else tmp_path / where
    result = CliRunner().invoke(app, [command, "--out", str(target / "out")])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: --out") and len(result.output.strip().splitlines()) == 1, result.output
