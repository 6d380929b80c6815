"""Live pick-up: `run --follow` and `serve` switch to an export newly committed to their folder, without a
restart or a lost frame, and refuse a tampered or unsigned one (runtime/live_export.py, folder_follow.py).

One small model of three memory products (weave, tiles, screw; memory tasks train in seconds): the line
starts on a signed export of the first two, the third is committed into the same folder while it runs.
Servers bind 127.0.0.1 on free ports and are always stopped; every wait is bounded.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from moleflow_edge.config import DetectorKind
from moleflow_edge.contract import MANIFEST_FILE, load_manifest, save_manifest
from moleflow_edge.runtime import UNKNOWN, Runtime, RuntimeOptions
from moleflow_edge.runtime.folder_follow import follow_folder
from moleflow_edge.runtime.live_export import LiveExport
from moleflow_edge.serving.libpython import serving_problem
from moleflow_edge.signing import generate_keypair
from tests.conftest import TINY_CONFIG

FIRST, NEW = ["weave", "tiles"], "screw"
WAIT_S = 120.0  # the longest any wait below may take before the test fails


@pytest.fixture(scope="module")
def line(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A model of three memory products, a signing key, and a signed export of the first two."""
    from moleflow_edge.export.exporter import export_model
    from moleflow_edge.train import train_task

    work = tmp_path_factory.mktemp("live")
    model = work / "model"
    for task in [*FIRST, NEW]:
        train_task(synth_root, task, model, TINY_CONFIG, progress=False, detector=DetectorKind.MEMORY)
    key, public = generate_keypair(work / "line.key")
    export_model(model, work / "two", tasks=FIRST, sign=key)
    return {"model": model, "key": key, "public": public, "two": work / "two", "data": synth_root}


def _line_export(line: dict, tmp_path: Path) -> Path:
    export = tmp_path / "export"
    shutil.copytree(line["two"], export)
    return export


def _commit_three(line: dict, export: Path) -> None:
    """The third product into the running export, incrementally, as `moleflow-edge export` commits it."""
    from moleflow_edge.export.exporter import export_model

    export_model(line["model"], export, sign=line["key"])


def _commit_refused(line: dict, export: Path, tmp_path: Path) -> Callable[[], None]:
    """The three-product export's files moved into ``export`` the way a commit does (files first, then
    one atomic rename of the manifest), with a manifest whose threshold was changed after signing
    (tampered); returns what commits the same manifest unsigned."""
    from moleflow_edge.export.exporter import export_model

    side = tmp_path / "side"
    shutil.copytree(export, side)
    export_model(line["model"], side, sign=line["key"])
    for path in side.rglob("*"):
        target = export / path.relative_to(side)
        if path.is_file() and path.name != MANIFEST_FILE and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    data = json.loads((side / MANIFEST_FILE).read_text())
    data["tasks"][0]["thresholds"] = {"fp32": 0.0}
    tampered = export / ".manifest.json.tampered.tmp"
    tampered.write_text(json.dumps(data))
    tampered.replace(export / MANIFEST_FILE)
    return lambda: save_manifest(export, load_manifest(side, verify=False))


def _frames(line: dict, task: str, count: int) -> list[Path]:
    return sorted((line["data"] / task / "test" / "good").glob("*.png"))[:count]


def _wait(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {WAIT_S} s: {what}")
        time.sleep(0.1)


# --- the folder source --------------------------------------------------------------------------------
def test_follow_takes_each_file_once_when_completely_written(tmp_path: Path) -> None:
    """A file still growing is not taken; a hidden (partial) file never; files in arrival order, each once."""
    folder = tmp_path / "drop"
    folder.mkdir()
    (folder / "b.png").write_bytes(b"x" * 10)  # there at start: taken after two polls
    polls: list[Callable[[], None]] = [
        lambda: (folder / "a.png").write_bytes(b"x" * 5),  # arrives later than b, sorts before it
        lambda: (folder / "a.png").write_bytes(b"x" * 9),  # still being written
        lambda: (folder / ".c.png.tmp").write_bytes(b"x"),  # a partial file of an atomic writer
        lambda: (folder / ".c.png.tmp").replace(folder / "c.png"),
        lambda: None,
        lambda: None,
    ]

    def sleep(_: float) -> None:
        polls.pop(0)() if polls else None

    taken = []
    for path in follow_folder(folder, frozenset({".png"}), sleep=sleep):
        if not polls and path is None:
            break
        if path is not None:
            taken.append(path.name)
    assert taken == ["b.png", "a.png", "c.png"]


# --- in process ------------------------------------------------------------------------------------
def test_switch_keeps_unchanged_graphs_warm_and_applies_the_new_router(line: dict, tmp_path: Path) -> None:
    export = _line_export(line, tmp_path)
    said: list[str] = []
    weave, screw = (cv2.imread(str(_frames(line, t, 1)[0])) for t in ("weave", NEW))
    runtime = Runtime.load(export, RuntimeOptions(trusted_keys=[line["public"]]))
    with LiveExport(runtime, said.append) as live:
        assert live.current().infer_one(weave).task == "weave"
        assert live.current().infer_one(screw).task == UNKNOWN  # no screw yet
        old_digest, loads = runtime.manifest.digest, runtime.engine_stats.loads
        _commit_three(line, export)
        new = live.current()
        assert new is not runtime and new.tasks == [*FIRST, NEW]
        assert new.infer_one(weave).task == "weave" and new.engine_stats.loads == loads  # weave stayed warm
        assert new.infer_one(screw).task == NEW
        assert len(said) == 1 and old_digest in said[0] and new.manifest.digest in said[0] and "weave" in said[0]
        live.record([0, 1])
        assert live.current() is new  # nothing new committed: no check beyond one stat
        assert [u["manifest"] for u in live.summary()["exports"]] == [old_digest, new.manifest.digest]


# --- run --follow ----------------------------------------------------------------------------------
def test_run_follow_picks_up_a_new_export_and_refuses_a_tampered_one(line: dict, tmp_path: Path) -> None:
    export, drop = _line_export(line, tmp_path), tmp_path / "drop"
    drop.mkdir()
    before = [*_frames(line, "weave", 2), *_frames(line, NEW, 1)]
    refused = [*_frames(line, "tiles", 1), *_frames(line, NEW, 1)]
    after = [*_frames(line, NEW, 3), *_frames(line, "tiles", 1)]
    total = len(before) + len(refused) + len(after)
    out, err = tmp_path / "out.jsonl", tmp_path / "err.txt"
    command = [sys.executable, "-m", "moleflow_edge.cli", "run", "--export", str(export), "--source", str(drop),
               "--follow", "--trusted-key", str(line["public"]), "--max-frames", str(total)]  # fmt: skip
    dropped = 0

    def drop_frames(paths: list[Path]) -> None:
        nonlocal dropped
        for path in paths:  # written beside, then renamed in: each arrives whole
            tmp = drop / f".{dropped:03d}.png.part"
            shutil.copy(path, tmp)
            tmp.replace(drop / f"{dropped:03d}_{path.parent.parent.parent.name}.png")
            dropped += 1

    def lines() -> list[dict]:
        return [json.loads(x) for x in out.read_text().splitlines() if x.strip()]

    with open(out, "w") as stdout, open(err, "w") as stderr:
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr)
    try:
        drop_frames(before)
        _wait(lambda: len(lines()) == len(before), "the first frames scored")
        commit_unsigned = _commit_refused(line, export, tmp_path)
        drop_frames(refused[:1])
        _wait(lambda: "refused" in err.read_text(), "the tampered manifest refused")
        commit_unsigned()
        drop_frames(refused[1:])
        _wait(lambda: err.read_text().count("refused") == 2, "the unsigned manifest refused")
        _commit_three(line, export)
        drop_frames(after)
        process.wait(WAIT_S)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            process.wait(30)
    records = lines()
    frames, summary = records[:-1], records[-1]["summary"]
    assert process.returncode == 0, err.read_text()
    assert [f["frame"] for f in frames] == list(range(total)) and all("error" not in f for f in frames)
    tasks = [f["task"] for f in frames]
    assert tasks[:3] == ["weave", "weave", UNKNOWN]  # screw before the commit: not a product yet
    assert tasks[3:5] == ["tiles", UNKNOWN]  # the refused manifests changed nothing
    assert tasks[5:] == [NEW, NEW, NEW, "tiles"]
    text = err.read_text()
    assert sum("refused the export newly committed" in x for x in text.splitlines()) == 2
    old, new = summary["exports"]
    assert (old["first_frame"], old["last_frame"], old["frames"]) == (0, 4, 5)
    assert (new["first_frame"], new["last_frame"], new["frames"]) == (5, total - 1, len(after))
    assert new["tasks"] == [*FIRST, NEW] and f"{old['manifest']} -> {new['manifest']}" in text
    assert len(summary["refused"]) == 2 and summary["frames"] == total and summary["errors"] == 0


# --- serve -----------------------------------------------------------------------------------------
@pytest.mark.skipif(serving_problem() is not None, reason=f"serving unavailable: {serving_problem()}")
def test_serve_picks_up_a_new_export_for_every_client(line: dict, tmp_path: Path) -> None:
    from moleflow_edge.serving.client import RemoteRuntime
    from moleflow_edge.serving.serve_process import ServeProcess

    export = _line_export(line, tmp_path)
    weave, screw = (cv2.imread(str(_frames(line, t, 1)[0])) for t in ("weave", NEW))
    log = tmp_path / "serve.log"
    with ServeProcess(export, log, "--trusted-key", str(line["public"])) as server:
        first, second = RemoteRuntime(server.http, retries=0), RemoteRuntime(server.grpc, retries=0)
        try:
            assert [r.task for r in first.infer([weave, screw])][0] == "weave"
            assert second.infer_one(screw).task == UNKNOWN
            commit_unsigned = _commit_refused(line, export, tmp_path)
            assert first.infer_one(weave).task == "weave"  # refused: the old export answers
            commit_unsigned()
            assert second.infer_one(weave).task == "weave"  # refused too
            _commit_three(line, export)
            got = [first.infer_one(screw), second.infer_one(screw), second.infer_one(weave)]
            assert [r.task for r in got] == [NEW, NEW, "weave"] and all(r.error is None for r in got)
            assert set(got[0].distances) == {*FIRST, NEW}  # the client learnt the new task order
            info = first._call(first._fetch_info)
        finally:
            first.close()
            second.close()
    old, new = info["exports"]
    assert (old["frames"], new["frames"]) == (5, 3) and new["tasks"] == [*FIRST, NEW]
    assert len(info["refused"]) == 2
    text = log.read_text()
    assert "refused the export newly committed" in text and f"{old['manifest']} -> {new['manifest']}" in text
    assert np.isfinite(got[0].image_score)


# --- learn on a running line -------------------------------------------------------------------------
@pytest.mark.skipif(serving_problem() is not None, reason=f"serving unavailable: {serving_problem()}")
def test_learn_adds_a_product_that_a_running_run_and_serve_pick_up(line: dict, tmp_path: Path) -> None:
    """The line (a signed export of two products) runs `run --follow` and `serve`; `learn` takes the third
    product from a folder of its frames into the model and that export. Both, never restarted, score its
    frames as it afterwards, with every frame answered and none in error."""
    from moleflow_edge.export.exporter import export_model
    from moleflow_edge.serving.client import RemoteRuntime
    from moleflow_edge.serving.serve_process import ServeProcess
    from moleflow_edge.train import train_task

    model, export, drop = tmp_path / "model", tmp_path / "export", tmp_path / "drop"
    for task in FIRST:
        train_task(line["data"], task, model, TINY_CONFIG, progress=False, detector=DetectorKind.MEMORY)
    export_model(model, export, sign=line["key"])
    drop.mkdir()
    screw = cv2.imread(str(_frames(line, NEW, 1)[0]))
    frames = [*_frames(line, "weave", 1), *_frames(line, NEW, 1), *_frames(line, NEW, 2)]
    out, err = tmp_path / "out.jsonl", tmp_path / "err.txt"
    command = [sys.executable, "-m", "moleflow_edge.cli", "run", "--export", str(export), "--source", str(drop),
               "--follow", "--trusted-key", str(line["public"]), "--max-frames", str(len(frames))]  # fmt: skip

    def drop_frame(k: int) -> None:
        shutil.copy(frames[k], drop / f".{k}.part")
        (drop / f".{k}.part").replace(drop / f"{k:03d}.png")

    def scored() -> int:
        return len([x for x in out.read_text().splitlines() if x.strip()])

    learn = [sys.executable, "-m", "moleflow_edge.cli", "learn", "--source", str(line["data"] / NEW / "train" / "good"),
             "--task", NEW, "--model", str(model), "--export", str(export), "--detector", "memory", "--frames", "15",
             "--target-fpr", "0.1", "--sign", str(line["key"]), "--threads", "1"]  # fmt: skip
    with ServeProcess(export, tmp_path / "serve.log", "--trusted-key", str(line["public"])) as server:
        with open(out, "w") as stdout, open(err, "w") as stderr:
            process = subprocess.Popen(command, stdout=stdout, stderr=stderr)
        remote = RemoteRuntime(server.http, retries=0)
        try:
            assert remote.infer_one(screw).task == UNKNOWN  # not a product of the line yet
            for k in (0, 1):
                drop_frame(k)
            _wait(lambda: scored() == 2, "the frames before learn scored")
            learned = subprocess.run(learn, capture_output=True, text=True, timeout=WAIT_S, check=False)
            assert learned.returncode == 0, learned.stdout + learned.stderr
            served = remote.infer_one(screw)
            for k in (2, 3):
                drop_frame(k)
            process.wait(WAIT_S)
        finally:
            remote.close()
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
                process.wait(30)
    records = [json.loads(x) for x in out.read_text().splitlines() if x.strip()]
    assert process.returncode == 0, err.read_text()
    assert served.task == NEW and served.error is None and served.is_anomaly is not None  # calibrated too
    assert [r["task"] for r in records[:-1]] == ["weave", UNKNOWN, NEW, NEW]
    assert all("error" not in r for r in records[:-1]) and records[-1]["summary"]["frames"] == len(frames)
    assert load_manifest(export).task_names == [*FIRST, NEW]
