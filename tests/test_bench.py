"""bench: the JSON report has every stage, percentile and backend field, and names what it skipped;
the interleaved timing that runtime_bench and export_bench use takes turns as it says; benchmarks/runtime_bench.py,
train_bench.py, export_bench.py and calib_bench.py run on the config and report that training has
(optimiser steps, not epochs)."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from moleflow_edge.bench.graph_cost import flop_report, graph_macs
from moleflow_edge.bench.machine import Peak
from moleflow_edge.bench.measure import measure_calls, measure_interleaved
from moleflow_edge.bench.run import BenchError, bench
from moleflow_edge.bench.tables import summary_table
from moleflow_edge.contract import load_manifest
from moleflow_edge.runtime.result import STAGES

PERCENTILES = {"p50", "p90", "p99"}
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str) -> ModuleType:
    """A benchmarks/ script as a module (benchmarks/ is not a package), without running its main."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def report(built: dict) -> dict:
    """The JSON report, with the lines bench printed under ``printed``."""
    printed: list[str] = []
    out = bench(
        built["export_dir"],
        backends=("torch-eager", "onnxruntime-cpu", "onnxruntime-cuda", "tensorrt"),
        precisions=("fp32", "int8"),
        batches=(1, 2),
        iters=3,
        data_root=built["data"],
        model_dir=None,  # torch-eager must be skipped, with the reason
        task_counts=(1, 3),
        printer=printed.append,
    )
    return {**json.loads(json.dumps(out)), "printed": "\n".join(printed)}  # what --json writes


def test_every_backend_that_ran_has_every_stage_and_percentile(report: dict) -> None:
    ran = {(r["backend"], r["precision"]) for r in report["results"]}
    assert ("onnxruntime-cpu", "fp32") in ran and ("onnxruntime-cpu", "int8") in ran
    for row in report["results"]:
        assert set(row) >= {"backend", "precision", "batch", "stages_ms", "end_to_end_ms", "throughput_fps",
                            "peak_rss_mb", "image_auroc"}  # fmt: skip
        assert set(row["stages_ms"]) == set(STAGES)
        for stage in STAGES:
            assert set(row["stages_ms"][stage]) == PERCENTILES
        assert set(row["end_to_end_ms"]) == PERCENTILES
        assert row["end_to_end_ms"]["p50"] <= row["end_to_end_ms"]["p99"]
        assert row["throughput_fps"] > 0 and row["peak_rss_mb"] > 0 and 0 <= row["image_auroc"] <= 1
    assert sorted(r["batch"] for r in report["results"] if r["precision"] == "fp32") == [1, 2]
    assert set(report["machine"]) >= {"cpus", "int8_dot_product", "onnxruntime"}


def test_skipped_backends_are_named_with_a_reason(report: dict) -> None:
    skipped = {(s["backend"], s["precision"]): s["reason"] for s in report["skipped"]}
    assert "--model" in skipped[("torch-eager", "fp32")]
    assert "fp32" in skipped[("torch-eager", "int8")]
    for backend in ("onnxruntime-cuda", "tensorrt"):
        ran = any(r["backend"] == backend for r in report["results"])
        assert ran or skipped[(backend, "fp32")]
    status = {(s["backend"], s["precision"]): s["status"] for s in report["summary"]}
    assert status[("torch-eager", "fp32")] == "skipped"
    assert "skipped" in summary_table(report["summary"])


def test_int8_on_a_cpu_without_vnni_is_flagged(report: dict) -> None:
    rows = [r for r in report["results"] if r["backend"] == "onnxruntime-cpu" and r["precision"] == "int8"]
    assert bool(rows[0].get("warning")) != report["machine"]["int8_dot_product"]


def test_flops_and_task_growth(report: dict, built: dict) -> None:
    manifest = load_manifest(built["export_dir"])
    macs = graph_macs(Path(built["export_dir"]) / manifest.backbone_graphs["fp32"].file)
    assert macs["Conv"] > 0
    backbone = next(r for r in report["flops"] if r["graph"] == "backbone")
    assert backbone["gflop"] == pytest.approx(2 * sum(macs.values()) / 1e9, rel=1e-3)
    assert 0 < backbone["fraction_of_peak"]
    assert [g["tasks"] for g in report["task_growth"]] == [1, 3]
    assert all(g["routing_ms_p50"] > 0 and g["engine_load_ms_mean"] > 0 for g in report["task_growth"])


def test_no_stage_is_above_the_peak_and_the_peak_says_what_it_was_measured_with(report: dict) -> None:
    peak = report["peak"]
    timed = [r for r in report["flops"] if "fraction_of_peak" in r]
    assert len(timed) == 2 and all(0 < r["fraction_of_peak"] <= 1 for r in timed)  # backbone and a detector
    assert all(r["achieved_gflops"] <= peak["gflops"] * (1 + 1e-3) for r in timed)
    shares = re.findall(r"([0-9.]+)% of peak", report["printed"])
    assert shares and all(float(s) <= 100.0 for s in shares)
    line = next(line for line in report["printed"].splitlines() if line.startswith("peak: "))
    assert "MatMul graph in onnxruntime CPU" in line and "best of 7 runs" in line and "threads" in line
    assert ("above the MatMul's" in line) == (peak["note"] is not None)


def test_a_stage_faster_than_the_measured_peak_becomes_the_peak(built: dict) -> None:
    """The MatMul's rate is a measurement too; a stage that beats it sets the peak (said so), not 100+ %."""
    manifest = load_manifest(built["export_dir"])
    slow = Peak(1e-3, "a deliberately slow stand-in figure")
    rows, peak = flop_report(Path(built["export_dir"]), manifest, {"backbone": 1.0, "detector": 0.5}, slow)
    fastest = max(rows, key=lambda r: r["achieved_gflops"])
    assert len(rows) == 2 and fastest["fraction_of_peak"] == 1.0 and all(r["fraction_of_peak"] <= 1 for r in rows)
    assert peak["gflops"] == pytest.approx(fastest["achieved_gflops"], rel=1e-3)
    assert peak["measured_with"] == slow.measured_with and fastest["graph"] in peak["note"]
    rows, peak = flop_report(Path(built["export_dir"]), manifest, {"backbone": 1.0}, Peak(1e9, "a huge figure"))
    assert peak["gflops"] == 1e9 and peak["note"] is None and rows[0]["fraction_of_peak"] < 1e-3


def test_auroc_floor_fails_below_it(built: dict) -> None:
    with pytest.raises(BenchError, match="below the floor"):
        bench(built["export_dir"], backends=("onnxruntime-cpu",), precisions=("fp32",), batches=(1,), iters=1,
              data_root=built["data"], auroc_floor=1.01, task_counts=(), printer=None)  # fmt: skip


def test_interleaved_timing_takes_turns_in_blocks_and_times_iters_calls_each() -> None:
    """runtime_bench's timing: every pipeline makes exactly ``iters`` timed calls on consecutive batches,
    in rounds whose order rotates, each block after one untimed warm-up call on the first batch."""
    calls: list[tuple[str, int]] = []

    def pipeline(name: str):
        def run(frames: list) -> tuple[dict[str, float], list]:
            calls.append((name, int(frames[0][0, 0, 0])))
            return {s: 1.0 for s in STAGES}, [("weave", 0.0)] * len(frames)

        return run

    frames = [np.full((2, 2, 3), i, np.uint8) for i in range(6)]
    measured = measure_interleaved({"a": pipeline("a"), "b": pipeline("b")}, frames, 2, 5, rounds=2)
    # round 0: a then b, 2 timed calls each; round 1: b then a, 3 each; batches start at frames 0, 2, 4
    assert calls == [("a", 0), ("a", 0), ("a", 2), ("b", 0), ("b", 0), ("b", 2),
                     ("b", 0), ("b", 4), ("b", 0), ("b", 2), ("a", 0), ("a", 4), ("a", 0), ("a", 2)]  # fmt: skip
    assert set(measured) == {"a", "b"}
    for m in measured.values():
        assert set(m["stages_ms"]) == set(STAGES) and m["stages_ms"]["detector"]["p50"] == 1.0
        assert set(m["end_to_end_ms"]) == PERCENTILES and m["throughput_fps"] > 0


def test_measure_calls_times_callables_through_the_same_interleaving() -> None:
    """export_bench's timing: callables that take no frames take turns as pipelines do, a warm-up
    call before each block, and come back as percentiles of milliseconds per call."""
    calls: list[str] = []
    measured = measure_calls({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 4, rounds=2)
    assert calls == ["a"] * 3 + ["b"] * 3 + ["b"] * 3 + ["a"] * 3  # round 0: a, b; round 1: b, a
    assert set(measured) == {"a", "b"} and all(set(m) == PERCENTILES for m in measured.values())


def test_runtime_bench_prepare_trains_every_product_for_the_given_steps(tmp_path: Path, monkeypatch) -> None:
    """prepare() builds a valid default-size config with max_steps = --steps, trains each product once
    and exports; data generation, training and export are stubbed (the real run takes ~40 s)."""
    runtime_bench = load_script("runtime_bench")
    trained: list[tuple[str, object]] = []
    exported: list[Path] = []
    monkeypatch.setattr("moleflow_edge.data.synth.generate", lambda root, *a, **k: Path(root).mkdir(parents=True))
    monkeypatch.setattr("moleflow_edge.train.train_task", lambda data, task, model_dir, config, **k: trained.append((task, config)))  # fmt: skip
    monkeypatch.setattr("moleflow_edge.export.exporter.export_model", lambda model_dir, out: exported.append(out))
    data, model_dir, export_dir = runtime_bench.prepare(tmp_path, 3)
    assert [task for task, _ in trained] == runtime_bench.TASKS
    for _, config in trained:
        flow = config.section("flow")
        assert (flow.max_steps, config.image_size, config.embed_dim, flow.num_mole_blocks) == (3, 224, 152, 6)
    assert exported == [export_dir] and data == tmp_path / "data" and model_dir == tmp_path / "model"


def test_train_bench_reports_time_per_optimiser_step(tmp_path: Path, monkeypatch, capsys) -> None:
    """train_bench's main on the tiny config alone, 8 images, 2 steps: one row per task with the per-step keys."""
    from conftest import TINY_CONFIG

    train_bench = load_script("train_bench")
    monkeypatch.setattr(train_bench, "CONFIGS", {"tiny-test": TINY_CONFIG.with_overrides(image_size=64)})
    monkeypatch.setattr(train_bench, "IMAGES_PER_TASK", 8)
    out = tmp_path / "train.json"
    monkeypatch.setattr("sys.argv", ["train_bench.py", "--steps", "2", "--json", str(out)])
    train_bench.main()
    rows = json.loads(out.read_text())["results"]
    assert [(r["config"], r["task_index"]) for r in rows] == [("tiny-test", 0), ("tiny-test", 1)]
    for row in rows:
        assert set(row) == {"config", "task_index", "images", "random_backbone", "steps", "seconds_per_step",
                            "feature_seconds", "max_steps", "seconds_per_task_max_steps"}  # fmt: skip
        assert (row["images"], row["steps"], row["max_steps"]) == (8, 2, TINY_CONFIG.section("flow").max_steps)
    assert "s/step" in capsys.readouterr().out


class _Prepared(Exception):
    """Raised by a stubbed prepare() to stop a benchmark's main once its arguments are known."""


def test_export_bench_trains_both_products_for_the_given_steps(tmp_path: Path, monkeypatch) -> None:
    """export_bench's --steps reaches prepare(), which builds a valid config with max_steps = steps, trains
    each product once and reuses a trained model; data generation and training are stubbed."""
    export_bench = load_script("export_bench")
    trained: list[tuple[str, object]] = []
    monkeypatch.setattr(export_bench, "generate", lambda root, *a, **k: Path(root).mkdir(parents=True))
    monkeypatch.setattr(export_bench, "train_task", lambda data, task, model_dir, config, **k: trained.append((task, config)))  # fmt: skip
    export_bench.prepare(tmp_path / "data", tmp_path / "model", 3)
    assert [task for task, _ in trained] == export_bench.TASKS
    assert all(
        (c.section("flow").max_steps, c.image_size, c.section("flow").num_mole_blocks) == (3, 224, 6)
        for _, c in trained
    )
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "tasks.json").write_text("{}")
    export_bench.prepare(tmp_path / "data", tmp_path / "model", 3)
    assert len(trained) == len(export_bench.TASKS)  # reused, not trained again

    def stop(data: Path, model_dir: Path, steps: int) -> None:
        raise _Prepared(steps)

    monkeypatch.setattr(export_bench, "prepare", stop)
    monkeypatch.setattr("sys.argv", ["export_bench.py", "--work", str(tmp_path), "--steps", "5"])
    logging_disabled = logging.root.manager.disable
    try:  # main() switches off logging up to WARNING (and sets torch's threads to their current count)
        with pytest.raises(_Prepared) as prepared:
            export_bench.main()
    finally:
        logging.disable(logging_disabled)
    assert prepared.value.args == (5,)


def test_calib_bench_trains_and_exports_for_the_given_steps(tmp_path: Path, monkeypatch) -> None:
    """calib_bench's --steps reaches prepare(), which trains each product with max_steps = steps and exports
    fp32 + int8, and reuses an existing export; data generation, training and export are stubbed."""
    calib_bench = load_script("calib_bench")
    trained: list[tuple[str, object]] = []
    exported: list[tuple[Path, tuple[str, ...]]] = []
    monkeypatch.setattr(calib_bench, "generate", lambda root, *a, **k: Path(root).mkdir(parents=True))
    monkeypatch.setattr(calib_bench, "train_task", lambda data, task, model_dir, config, **k: trained.append((task, config)))  # fmt: skip
    monkeypatch.setattr(calib_bench, "export_model", lambda model, out, precisions, **k: exported.append((out, precisions)))  # fmt: skip
    data, model, export = calib_bench.prepare(tmp_path, 4)
    assert [task for task, _ in trained] == calib_bench.TASKS
    assert all((config.section("flow").max_steps, config.image_size) == (4, 224) for _, config in trained)
    assert exported == [(export, ("fp32", "int8"))] and (data, model) == (tmp_path / "data", tmp_path / "model")
    export.mkdir()
    (export / "manifest.json").write_text("{}")
    calib_bench.prepare(tmp_path, 4)
    assert len(trained) == len(calib_bench.TASKS) and len(exported) == 1  # reused, not trained again

    def stop(work: Path, steps: int) -> None:
        raise _Prepared(work, steps)

    monkeypatch.setattr(calib_bench, "prepare", stop)
    monkeypatch.setattr("sys.argv", ["calib_bench.py", str(tmp_path), "--steps", "5"])
    with pytest.raises(_Prepared) as prepared:
        calib_bench.main()
    assert prepared.value.args == (tmp_path, 5)
