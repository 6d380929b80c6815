"""Engine selection to a latency target on a real fp32 + int8 export, timed with a fake clock.

Every timed frame really runs through onnxruntime; only the clock is scripted: a frame at a
precision costs what ``costs`` says, so which candidate meets the target is decided by the test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moleflow_edge.calibration import calibrate
from moleflow_edge.cli import app
from moleflow_edge.contract import load_manifest, save_manifest
from moleflow_edge.runtime import BackendError, Runtime, RuntimeOptions, engine_select
from moleflow_edge.runtime.engine_select import LATENCY_CACHE, TIMED_FRAMES, WARMUP_FRAMES, LatencyTargetWarning

CPU = "onnxruntime-cpu"


class FakeClock:
    """Seconds that move only when a frame runs, by that precision's scripted cost."""

    def __init__(self) -> None:
        self.now = 0.0
        self.calls = 0
        self.costs_ms: dict[str, float] = {"fp32": 20.0, "int8": 8.0}

    def __call__(self) -> float:
        self.calls += 1
        return self.now


def no_clock() -> float:
    raise AssertionError("the clock was read: cached timings were not used")


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    real = Runtime.score_as

    def score_as(self: Runtime, resized, task: str):
        out = real(self, resized, task)
        fake.now += fake.costs_ms[self.precision.value] / 1e3
        return out

    monkeypatch.setattr(Runtime, "score_as", score_as)
    return fake


def record_auroc(export_dir: Path, **by_precision: float) -> None:
    """What calibrate records, written directly: every task gets the same AUROC per precision."""
    manifest = load_manifest(export_dir)
    for entry in manifest.tasks:
        entry.image_auroc = dict(by_precision)
    save_manifest(export_dir, manifest)


def load(export_dir: Path, target_ms: float, clock: object, **kwargs: object) -> Runtime:
    options = RuntimeOptions(latency_target_ms=target_ms, **kwargs)  # type: ignore[arg-type]
    return Runtime.load(export_dir, options, clock=clock)  # type: ignore[arg-type]


# --- choosing --------------------------------------------------------------------------------------
def test_picks_the_most_accurate_candidate_that_meets_the_target(export_copy: Path, clock: FakeClock) -> None:
    record_auroc(export_copy, fp32=0.97, int8=0.99)  # int8 measured better: the record wins over bits
    with load(export_copy, 50, clock) as rt:
        choice = rt.engine_choice
        assert choice is not None and choice.met and not choice.cached
        assert choice.chosen.key == f"{CPU}/int8" and rt.precision.value == "int8"
        assert choice.ms == {f"{CPU}/fp32": pytest.approx(20.0), f"{CPU}/int8": pytest.approx(8.0)}
        assert clock.calls == 2 * 2 * TIMED_FRAMES  # two candidates, two readings per timed frame
        assert (
            "chose onnxruntime-cpu/int8 (8.00 ms/frame in the engines at batch 1, image AUROC 0.9900)"
            in choice.summary()
        )
        assert "image AUROC calibrate recorded" in choice.reason

    record_auroc(export_copy, fp32=0.99, int8=0.95)  # a calibration changes accuracy, not timings
    with load(export_copy, 50, no_clock) as rt:
        assert rt.engine_choice.chosen.key == f"{CPU}/fp32" and rt.precision.value == "fp32"
    with load(export_copy, 15, no_clock) as rt:  # fp32's 20 ms is over: the best that meets 15 ms
        assert rt.engine_choice.chosen.key == f"{CPU}/int8" and rt.engine_choice.met


def test_without_recorded_accuracy_higher_precision_ranks_first(export_copy: Path, clock: FakeClock) -> None:
    with load(export_copy, 50, clock) as rt:
        assert rt.engine_choice.chosen.key == f"{CPU}/fp32"
        assert rt.engine_choice.accuracy == {"fp32": None, "int8": None}
        assert "ranked by precision" in rt.engine_choice.reason and "calibrate --precision" in rt.engine_choice.reason
    record_auroc(export_copy, int8=0.9)  # a record for int8 alone puts it above the unrecorded fp32
    with load(export_copy, 50, no_clock) as rt:
        assert rt.engine_choice.chosen.key == f"{CPU}/int8"


def test_nothing_meets_the_target_picks_the_fastest_and_warns(export_copy: Path, clock: FakeClock) -> None:
    record_auroc(export_copy, fp32=0.99, int8=0.9)
    with pytest.warns(LatencyTargetWarning, match="nothing meets 5 ms"):
        rt = load(export_copy, 5, clock)
    with rt:
        assert rt.engine_choice.chosen.key == f"{CPU}/int8" and not rt.engine_choice.met
        assert rt.precision.value == "int8"


def test_precision_argument_limits_the_candidates(export_copy: Path, clock: FakeClock) -> None:
    record_auroc(export_copy, fp32=0.9, int8=0.99)
    with load(export_copy, 50, clock, precision="fp32", backend=CPU) as rt:
        assert rt.engine_choice.chosen.key == f"{CPU}/fp32" and list(rt.engine_choice.ms) == [f"{CPU}/fp32"]


def test_bad_targets_and_no_candidates_are_named(export_copy: Path, clock: FakeClock) -> None:
    for bad in (0, -3, math.nan, math.inf):
        with pytest.raises(ValueError, match="latency target must be a number of milliseconds > 0"):
            load(export_copy, bad, clock)
    with pytest.raises(BackendError, match="no precision or target.*no ONNX graphs at fp16"):
        load(export_copy, 50, clock, precision="fp16")
    with pytest.raises(BackendError, match="openvino-cpu: OpenVINO is not installed"):
        load(export_copy, 50, clock, backend="openvino")
    with pytest.raises(ValueError, match="cannot be combined"):
        load(export_copy, 50, clock, providers=["CPUExecutionProvider"])
    assert clock.calls == 0


# --- the per-machine cache -------------------------------------------------------------------------
def test_timings_are_cached_per_machine_and_export(
    export_copy: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    load(export_copy, 50, clock).close()
    cache = json.loads((export_copy / LATENCY_CACHE).read_text())
    ((machine, entry),) = cache["machines"].items()
    assert machine == engine_select.machine_key()
    assert entry["ms"] == {f"{CPU}/fp32": pytest.approx(20.0), f"{CPU}/int8": pytest.approx(8.0)}
    assert (entry["warmup"], entry["frames"]) == (WARMUP_FRAMES, TIMED_FRAMES)

    with load(export_copy, 50, no_clock) as rt:  # same machine, same export: nothing is timed again
        assert rt.engine_choice.cached and "cached timings" in rt.engine_choice.summary()

    manifest = load_manifest(export_copy)
    manifest.model_sha256 = "0" * 64  # another model behind the same folder: the timings are stale
    save_manifest(export_copy, manifest)
    clock.costs_ms = {"fp32": 4.0, "int8": 3.0}
    calls = clock.calls
    with load(export_copy, 10, clock) as rt:
        assert clock.calls > calls and not rt.engine_choice.cached
        assert rt.engine_choice.ms[f"{CPU}/fp32"] == pytest.approx(4.0)

    monkeypatch.setattr(engine_select, "machine_key", lambda: "another line PC")
    calls = clock.calls
    load(export_copy, 10, clock).close()
    assert clock.calls > calls
    assert len(json.loads((export_copy / LATENCY_CACHE).read_text())["machines"]) == 2


def test_damaged_cache_is_timed_again(export_copy: Path, clock: FakeClock) -> None:
    (export_copy / "engines").mkdir(exist_ok=True)
    (export_copy / LATENCY_CACHE).write_text("{not json")
    with load(export_copy, 50, clock) as rt:
        assert not rt.engine_choice.cached and clock.calls > 0
    assert json.loads((export_copy / LATENCY_CACHE).read_text())["format"] == engine_select.CACHE_FORMAT


# --- what calibrate records ------------------------------------------------------------------------
def test_calibrate_records_image_auroc_per_precision(export_copy: Path, built: dict, clock: FakeClock) -> None:
    reports = {p: calibrate(export_copy, built["data"], 0.1, precision=p) for p in ("fp32", "int8")}
    manifest = load_manifest(export_copy)
    for entry in manifest.tasks:
        for precision, report in reports.items():
            row = next(t for t in report.tasks if t.task == entry.name)
            assert row.image_auroc is not None and 0.0 <= row.image_auroc <= 1.0
            assert entry.image_auroc[precision] == row.image_auroc  # the int8 run kept fp32's record
    with load(export_copy, 50, clock, precision="fp32") as rt:
        expected = sum(e.image_auroc["fp32"] for e in manifest.tasks) / len(manifest.tasks)
        assert rt.engine_choice.accuracy["fp32"] == pytest.approx(expected)
        assert rt.engine_choice.note is None  # each precision has its own threshold now


# --- the command line ------------------------------------------------------------------------------
def test_run_latency_target_says_what_it_chose(export_copy: Path, built: dict, clock: FakeClock) -> None:
    record_auroc(export_copy, fp32=0.99, int8=0.95)
    load(export_copy, 50, clock).close()  # times with the fake clock; the CLI reads the cache
    image = min((built["data"] / "weave" / "test" / "good").glob("*.png"))
    run = ["run", "--export", str(export_copy), "--source", str(image), "--latency-target"]
    result = CliRunner().invoke(app, [*run, "15"])
    assert result.exit_code == 0, result.output
    assert "latency target 15 ms: chose onnxruntime-cpu/int8 (8.00 ms/frame" in result.output
    assert "the most accurate of 1 candidate(s) within 15 ms" in result.output
    summary = json.loads(next(line for line in result.output.splitlines() if line.startswith('{"summary"')))["summary"]
    assert summary["precision"] == "int8" and summary["latency_target"]["chosen"] == f"{CPU}/int8"

    missed = CliRunner().invoke(app, [*run, "1"])
    assert missed.exit_code == 0, missed.output
    assert "warning: latency target 1 ms: chose onnxruntime-cpu/int8" in missed.output
    assert "nothing meets 1 ms" in missed.output

    refused = CliRunner().invoke(app, [*run, "0"])
    assert refused.exit_code == 2 and "latency target must be a number of milliseconds > 0" in refused.output
