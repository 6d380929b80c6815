"""The lean runtime on a real export: parity with PyTorch, routing, bad frames, engine cache, run loop."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest

from moleflow_edge.contract import ManifestError, load_manifest
from moleflow_edge.model_store import ModelStore
from moleflow_edge.preprocess import read_image_bgr
from moleflow_edge.runtime import (
    UNKNOWN,
    Backend,
    BackendError,
    FrameResult,
    RunOptions,
    RunOutcome,
    Runtime,
    RuntimeOptions,
    run_source,
    sources,
)
from moleflow_edge.runtime.backend import DetectorEngine, FeatureBatch, module_available
from moleflow_edge.runtime.engine_cache import EngineCache
from moleflow_edge.runtime.ort_backend import _contiguous_runs
from moleflow_edge.torch_backend import model_runtime
from tests.conftest import TINY_CONFIG

TRAINED = ["weave", "tiles", "screw"]  # "cap" is never trained: its images must come out unknown
REPO = Path(__file__).resolve().parents[1]
SCORE_RTOL = 1e-4


@pytest.fixture(scope="module")
def exported(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from moleflow_edge.export.exporter import export_model
    from moleflow_edge.train import train_task

    work = tmp_path_factory.mktemp("runtime")
    model_dir, export_dir = work / "model", work / "export"
    for task in TRAINED:
        train_task(synth_root, task, model_dir, TINY_CONFIG, steps=12, progress=False)
    export_model(model_dir, export_dir)
    return {"model_dir": model_dir, "export_dir": export_dir, "work": work}


@pytest.fixture(scope="module")
def frames(synth_root: Path) -> list[tuple[str, np.ndarray]]:
    """(category, frame) for every test image; every other frame rescaled to a non-square camera size."""
    out = []
    for category in [*TRAINED, "cap"]:
        for k, path in enumerate(sorted((synth_root / category / "test").rglob("*.png"))):
            image = read_image_bgr(path)
            if k % 2:
                image = cv2.resize(image, (200, 150), interpolation=cv2.INTER_LINEAR)
            out.append((category, image))
    return out


@pytest.fixture(scope="module")
def reference(exported: dict, frames: list) -> list[FrameResult]:
    """What the PyTorch model says for every frame, through the same Runtime over the torch backend:
    what the exported graphs are held to."""
    return model_runtime(exported["model_dir"]).infer([f for _, f in frames])


@pytest.fixture(scope="module")
def runtime(exported: dict) -> Runtime:
    rt = Runtime.load(exported["export_dir"], RuntimeOptions("onnxruntime"))
    yield rt
    rt.close()


def _check_against_reference(results: list[FrameResult], frames: list, reference: list[FrameResult]) -> None:
    assert [r.task for r in results] == [r.task for r in reference]
    for result, expected, (_, frame) in zip(results, reference, frames, strict=True):
        assert result.error is None
        if result.task == UNKNOWN:  # stopped, yet its map comes from the flow that explains it best
            assert result.image_score is None and result.is_anomaly is None
            assert result.explained_by == expected.explained_by
        else:
            assert result.explained_by is None
            assert result.image_score == pytest.approx(expected.image_score, rel=SCORE_RTOL)
        assert result.anomaly_map.shape == frame.shape[:2]
        scale = float(np.abs(expected.anomaly_map).max())
        np.testing.assert_allclose(result.anomaly_map, expected.anomaly_map, rtol=0, atol=SCORE_RTOL * scale)


# --- torch-free ------------------------------------------------------------------------------------
def test_runtime_imports_and_runs_without_torch(exported: dict, tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), np.full((90, 110, 3), 120, np.uint8))
    code = textwrap.dedent(
        f"""
        import io, sys
        import numpy as np
        def torch_modules():
            return sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
        import moleflow_edge.runtime as runtime
        import moleflow_edge.runtime.tensorrt_backend, moleflow_edge.runtime.cuda_memory
        import moleflow_edge.runtime.openvino_backend
        assert not torch_modules(), torch_modules()
        exporter = sorted(m for m in sys.modules if m.startswith("moleflow_edge.export"))
        assert not exporter, f"the runtime imports the exporter: {{exporter}}"
        rt = runtime.Runtime.load({str(exported["export_dir"])!r}, runtime.RuntimeOptions("onnxruntime"))
        results = rt.infer([np.full((100, 120, 3), 128, np.uint8), None])
        assert results[0].error is None and results[1].error is not None
        quiet = dict(out=io.StringIO(), err=io.StringIO())
        code = runtime.run_source({str(folder)!r}, runtime.RunOptions({str(exported["export_dir"])!r}), **quiet)
        assert code is runtime.RunOutcome.DONE, code
        assert not torch_modules(), torch_modules()
        print("torch-free")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "torch-free" in done.stdout


# --- parity with PyTorch ---------------------------------------------------------------------------
def test_results_equal_pytorch_model(runtime: Runtime, frames: list, reference: list[FrameResult]) -> None:
    results = runtime.infer([f for _, f in frames])
    _check_against_reference(results, frames, reference)
    for (category, _), result in zip(frames, results, strict=True):  # a trained product is never taken for another one
        assert result.task in (category, UNKNOWN) if category in TRAINED else result.task == UNKNOWN


def test_io_binding_path_with_router_graph_matches(exported: dict, frames: list, reference: list[FrameResult]) -> None:
    """The device path (bound OrtValues, router.onnx) run on the CPU device: same results."""
    with Runtime.load(exported["export_dir"], RuntimeOptions("onnxruntime", io_binding=True)) as rt:
        assert "IOBinding" in rt.description
        assert rt._backend.routes_on_device
        _check_against_reference(rt.infer([f for _, f in frames]), frames, reference)


@pytest.mark.skipif(not module_available("openvino"), reason="openvino not installed (optional)")
def test_openvino_backend_matches(exported: dict, frames: list, reference: list[FrameResult]) -> None:
    with Runtime.load(exported["export_dir"], RuntimeOptions("openvino")) as rt:
        assert rt.backend is Backend.OPENVINO
        _check_against_reference(rt.infer([f for _, f in frames]), frames, reference)


def test_mixed_batch_keeps_input_order_and_equals_single_frames(runtime: Runtime, frames: list) -> None:
    order = [0, 40, 12, 25, 1, 13, 26, 33]  # weave, cap, tiles, screw, weave, ...
    batch = runtime.infer([frames[i][1] for i in order])
    assert [r.index for r in batch] == list(range(len(order)))
    assert len({r.task for r in batch}) >= 3
    for result, i in zip(batch, order, strict=True):
        single = runtime.infer_one(frames[i][1])
        assert result.task == single.task
        assert result.distances == pytest.approx(single.distances, rel=1e-5)
        if single.task != UNKNOWN:
            assert result.image_score == pytest.approx(single.image_score, rel=1e-5)
            np.testing.assert_allclose(result.anomaly_map, single.anomaly_map, rtol=1e-5, atol=1e-5)


def test_batch_as_one_4d_array(runtime: Runtime, frames: list) -> None:
    stack = np.stack([frames[0][1], frames[2][1]])
    results = runtime.infer(stack)
    assert [r.image_score for r in results] == pytest.approx([runtime.infer_one(f).image_score for f in stack])


# --- unknown products and bad frames -----------------------------------------------------------------
def test_a_flow_that_fails_to_load_fails_its_frames_only(
    runtime: Runtime, frames: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Frames routed to a task whose flow cannot load get that error; unknown frames stay valid
    unknowns, mapped by the candidates that did load."""
    broken, loaded = TRAINED[0], runtime.engines.get

    def get(task: str):  # noqa: ANN202 - the engine cache's own return type
        if task == broken:
            raise BackendError(f"{task}.onnx is damaged")
        return loaded(task)

    monkeypatch.setattr(runtime.engines, "get", get)
    results = runtime.infer([f for _, f in frames])
    for result in results:
        if result.task == broken:
            assert result.error == f"task {broken!r}: {broken}.onnx is damaged"
        else:
            assert result.error is None
        if result.task == UNKNOWN:
            assert result.explained_by in TRAINED[1:] and result.anomaly_map is not None
    assert runtime.load_failures.pop(broken) == f"{broken}.onnx is damaged"


def test_router_carries_each_tasks_patch_level(exported: dict, runtime: Runtime) -> None:
    """The export's router file brings every task's normal patch-score level to the runtime, which
    weighs the flows that may explain an unknown frame with it."""
    _, prototypes = ModelStore(exported["model_dir"]).load()
    for task in TRAINED:
        assert prototypes[task].patch_level is not None  # measured at training
        assert runtime.router.patch_levels[task] == pytest.approx(prototypes[task].patch_level, rel=1e-6)


def test_untrained_product_is_unknown(runtime: Runtime, frames: list) -> None:
    results = runtime.infer([f for c, f in frames if c == "cap"])
    assert results and all(r.task == UNKNOWN for r in results)
    for r in results:  # no score and no decision: the line stops it; a map from the nearby flow that fits best
        assert r.error is None and r.image_score is None and r.is_anomaly is None
        assert r.explained_by in TRAINED and r.anomaly_map is not None
        assert set(r.distances) == set(TRAINED)
    quick = runtime.infer([f for c, f in frames if c == "cap"], with_maps=False)
    assert all(r.explained_by is None and r.anomaly_map is None and r.patch_scores is None for r in quick)


def test_bad_frames_fail_alone(runtime: Runtime, frames: list) -> None:
    good = frames[0][1]
    bad = {
        1: np.zeros((0, 64, 3), np.uint8),
        2: good.astype(np.float32),
        3: np.zeros((64, 64, 4), np.uint8),
        4: None,
        5: good[:, :, 0],
    }
    batch = [bad.get(i, good) for i in range(7)]
    results = runtime.infer(batch)
    expected = runtime.infer_one(good)
    for i, result in enumerate(results):
        if i in bad:
            assert result.error and result.task is None and result.image_score is None
        else:
            assert result.error is None
            assert result.image_score == pytest.approx(expected.image_score, rel=1e-6)
    assert "empty" in results[1].error
    assert "float32" in results[2].error
    assert "4 channels" in results[3].error
    assert "NoneType" in results[4].error
    assert runtime.infer_one(None).error  # a single bad frame is a result too, not an exception


# --- artifacts -------------------------------------------------------------------------------------
def _copy_export(exported: dict, tmp_path: Path) -> Path:
    target = tmp_path / "export"
    shutil.copytree(exported["export_dir"], target)
    return target


def _flow_file(export_dir: Path, task: str) -> Path:
    return export_dir / load_manifest(export_dir, verify=False).task(task).graphs["fp32"].file


def test_tampered_graph_is_refused_at_load(exported: dict, tmp_path: Path) -> None:
    export_dir = _copy_export(exported, tmp_path)
    flow = _flow_file(export_dir, "tiles")
    data = bytearray(flow.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flow.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="tiles"):
        Runtime.load(export_dir)


def test_graph_replaced_after_load_fails_only_its_task(exported: dict, tmp_path: Path, frames: list) -> None:
    export_dir = _copy_export(exported, tmp_path)
    with Runtime.load(export_dir, RuntimeOptions("onnxruntime")) as rt:
        flow = _flow_file(export_dir, "screw")
        flow.write_bytes(flow.read_bytes() + b"\0")  # changed before the lazy load of that task
        picks = [next(f for c, f in frames if c == t) for t in TRAINED]
        results = rt.infer(picks)
    by_task = {r.task: r for r in results}
    assert "changed after the export was loaded" in (results[2].error or "")
    assert results[0].error is None and results[1].error is None
    assert set(by_task) >= {"weave", "tiles"}


def test_options_are_one_object(exported: dict) -> None:
    """Runtime.load takes one RuntimeOptions, never loose fields beside or instead of it."""
    with pytest.raises(TypeError):
        Runtime.load(exported["export_dir"], backend="onnxruntime")  # type: ignore[call-arg]
    with Runtime.load(exported["export_dir"], RuntimeOptions("onnxruntime", max_map_side=64)) as rt:
        assert rt.max_map_side == 64


def test_unknown_backend_and_precision_are_named(exported: dict) -> None:
    with pytest.raises(ValueError, match="onnxruntime"):
        Runtime.load(exported["export_dir"], RuntimeOptions("tensorflow"))
    with pytest.raises(ValueError, match="fp32"):
        Runtime.load(exported["export_dir"], RuntimeOptions(precision="fp64"))


@pytest.mark.skipif(module_available("tensorrt"), reason="tensorrt is installed here")
def test_tensorrt_backend_says_what_to_install(exported: dict) -> None:
    with pytest.raises(BackendError, match="pip install"):
        Runtime.load(exported["export_dir"], RuntimeOptions("tensorrt"))


# --- resident engines ------------------------------------------------------------------------------
def test_resident_engine_cap_is_honoured(exported: dict, frames: list) -> None:
    picks = {t: next(f for c, f in frames if c == t) for t in TRAINED}
    with Runtime.load(exported["export_dir"], RuntimeOptions("onnxruntime", max_resident_tasks=1)) as rt:
        for task in ["weave", "tiles", "weave", "screw", "screw"]:
            assert rt.infer_one(picks[task]).task == task
            assert len(rt.resident_tasks) <= 1
        stats = rt.engine_stats
        assert (stats.loads, stats.unloads, stats.hits) == (4, 3, 1)
        assert stats.unloaded == ["weave", "tiles", "weave"]
        assert rt.resident_tasks == ["screw"]
        assert len(stats.load_seconds["weave"]) == 2 and all(s > 0 for s in stats.load_seconds["weave"])
        mixed = rt.infer(list(picks.values()))  # three tasks in one batch with room for one engine
        assert [r.task for r in mixed] == TRAINED and all(r.image_score is not None for r in mixed)


def test_memory_budget_keeps_one_engine(exported: dict, frames: list) -> None:
    picks = [next(f for c, f in frames if c == t) for t in TRAINED]
    options = RuntimeOptions("onnxruntime", max_resident_tasks=None, memory_budget_mb=0.001)
    with Runtime.load(exported["export_dir"], options) as rt:
        results = rt.infer(picks)
        assert all(r.error is None for r in results)
        assert len(rt.resident_tasks) == 1 and rt.engine_stats.unloads == 2


class _FakeEngine(DetectorEngine):
    def __init__(self, task: str, nbytes: int, closed: list[str]) -> None:
        self.task, self.estimated_bytes, self._closed = task, nbytes, closed

    def run(self, features: FeatureBatch, rows: list[int]) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros((len(rows), 2, 2)), np.zeros(len(rows))

    def close(self) -> None:
        self._closed.append(self.task)


def test_engine_cache_evicts_least_recently_used_by_count_and_bytes() -> None:
    closed: list[str] = []
    sizes = {"a": 40, "b": 40, "c": 40, "d": 90}
    cache = EngineCache(lambda t: _FakeEngine(t, sizes[t], closed), 2, 100, estimate=sizes.__getitem__)
    for task in ["a", "b", "a", "c"]:
        cache.get(task)
    assert cache.resident == ["a", "c"] and closed == ["b"]
    cache.get("d")  # 90 bytes: only room for itself
    assert cache.resident == ["d"] and closed == ["b", "a", "c"]
    assert (cache.stats.loads, cache.stats.unloads, cache.stats.hits) == (4, 3, 1)
    with pytest.raises(ValueError, match="max_resident_tasks"):
        EngineCache(lambda t: _FakeEngine(t, 1, closed), 0)


def test_contiguous_runs() -> None:
    assert _contiguous_runs([0, 1, 2, 5, 6, 9]) == [(0, 3), (5, 7), (9, 10)]
    assert _contiguous_runs([3]) == [(3, 4)]


# --- the run loop ----------------------------------------------------------------------------------
def _lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_run_over_a_folder_with_a_corrupt_file(exported: dict, synth_root: Path, tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    for task in [*TRAINED, "cap"]:
        shutil.copy(sorted((synth_root / task / "test" / "good").glob("*.png"))[0], folder / f"{task}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    overlays = tmp_path / "overlays"
    out, err = io.StringIO(), io.StringIO()
    options = RunOptions(exported["export_dir"], RuntimeOptions("onnxruntime"), save_dir=overlays)
    code = run_source(str(folder), options, out=out, err=err)
    assert code is RunOutcome.DONE
    lines = _lines(out.getvalue())
    frames_out, summary = lines[:-1], lines[-1]["summary"]
    assert len(frames_out) == 5
    broken = [line for line in frames_out if "broken" in line["source"]]
    assert len(broken) == 1 and "cannot decode" in broken[0]["error"]
    good = [line for line in frames_out if "error" not in line]
    assert {line["task"] for line in good} >= {"weave", "tiles", "screw"}
    for line in good:
        assert set(line["latency_ms"]) >= {"preprocess", "backbone", "routing", "detector", "postprocess", "total"}
        assert Path(line["overlay"]).is_file()
        assert cv2.imread(line["overlay"]).shape == (128, 128, 3)
    assert len(list(overlays.glob("*.png"))) == 4
    assert summary["frames"] == 5 and summary["errors"] == 1 and summary["unknown"] >= 1
    assert summary["latency_ms"]["total"]["p50"] > 0 and summary["outcome"] == "done"
    assert "frames/s" in err.getvalue() and "p99" in err.getvalue()


def test_run_over_a_video_file(exported: dict, frames: list, tmp_path: Path) -> None:
    video = tmp_path / "line.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5, (128, 128))
    if not writer.isOpened():
        pytest.skip("this OpenCV build cannot write MJPG video")
    for _, frame in frames[:4]:
        writer.write(cv2.resize(frame, (128, 128)))
    writer.release()
    out = io.StringIO()
    code = run_source(str(video), RunOptions(exported["export_dir"], batch_size=2), out=out, err=io.StringIO())
    lines = _lines(out.getvalue())
    assert code is RunOutcome.DONE and len(lines) == 5 and lines[-1]["summary"]["processed"] == 4
    assert [line["frame"] for line in lines[:-1]] == [0, 1, 2, 3]


class _FakeCamera:
    """Delivers ``good`` frames, then fails (or raises ``then``) on every read."""

    def __init__(self, frame: np.ndarray, good: int, then: type[BaseException] | None = None) -> None:
        self.frame, self.good, self.then, self.reads, self.opens = frame, good, then, 0, 1

    def isOpened(self) -> bool:  # noqa: N802 - cv2's name
        return True

    def read(self) -> tuple[bool, np.ndarray | None]:
        self.reads += 1
        if self.reads <= self.good:
            return True, self.frame
        if self.then is not None:
            raise self.then()
        return False, None

    def release(self) -> None:
        pass


def test_camera_that_stops_is_retried_then_exits_nonzero(
    exported: dict, frames: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    camera = _FakeCamera(frames[0][1], good=3)
    opened: list[object] = []
    monkeypatch.setattr(sources, "open_capture", lambda source: opened.append(source) or camera)
    out, err = io.StringIO(), io.StringIO()
    options = RunOptions(exported["export_dir"], camera_retries=2, retry_delay_s=0, batch_size=2)
    code = run_source("camera:0", options, out=out, err=err)
    assert code is RunOutcome.LOST
    lines = _lines(out.getvalue())
    assert len(lines) == 4 and lines[-1]["summary"]["processed"] == 3  # the half-full batch is not lost
    assert opened == [0, 0, 0]  # opened, then reopened once per retry
    assert "camera 0 stopped delivering frames" in err.getvalue()


def test_ctrl_c_ends_with_the_summary(exported: dict, frames: list, monkeypatch: pytest.MonkeyPatch) -> None:
    camera = _FakeCamera(frames[0][1], good=2, then=KeyboardInterrupt)
    monkeypatch.setattr(sources, "open_capture", lambda source: camera)
    out = io.StringIO()
    code = run_source("camera:1", RunOptions(exported["export_dir"]), out=out, err=io.StringIO())
    summary = _lines(out.getvalue())[-1]["summary"]
    assert code is RunOutcome.INTERRUPTED and summary["interrupted"] and summary["processed"] == 2


def test_run_reports_a_missing_source_and_a_tampered_export(exported: dict, tmp_path: Path) -> None:
    err = io.StringIO()
    assert (
        run_source(str(tmp_path / "nothing"), RunOptions(exported["export_dir"]), out=io.StringIO(), err=err)
        is RunOutcome.SOURCE_UNREADABLE
    )
    assert "not a folder" in err.getvalue()
    export_dir = _copy_export(exported, tmp_path)
    flow = _flow_file(export_dir, "weave")
    flow.write_bytes(flow.read_bytes()[:-1])
    err = io.StringIO()
    assert run_source(str(tmp_path), RunOptions(export_dir), out=io.StringIO(), err=err) is RunOutcome.LOAD_FAILED
    assert "does not match the manifest" in err.getvalue()


def test_precision_that_was_not_exported_is_refused(exported: dict) -> None:
    with pytest.raises(ManifestError, match="--precision fp16"):
        Runtime.load(exported["export_dir"], RuntimeOptions(precision="fp16"))


def test_run_one_image_with_show_and_no_display(exported: dict, synth_root: Path) -> None:
    image = sorted((synth_root / "weave" / "test" / "good").glob("*.png"))[0]
    out, err = io.StringIO(), io.StringIO()
    assert run_source(str(image), RunOptions(exported["export_dir"], show=True), out=out, err=err) is RunOutcome.DONE
    lines = _lines(out.getvalue())
    assert lines[0]["task"] == "weave" and lines[-1]["summary"]["processed"] == 1
    assert "--show ignored" in err.getvalue()  # no DISPLAY here, and opencv-python-headless has no windows
