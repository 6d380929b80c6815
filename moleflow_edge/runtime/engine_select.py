"""Engine selection to a latency target: time every precision and target of an export that this
machine can run, at batch 1, and pick the most accurate one that meets the target.

Candidates are the rows of the target table (moleflow_edge.targets) installed here, crossed with
the precisions the export holds (ONNX graphs, or TensorRT engines for the engine targets). Each is
loaded and timed on a few frames after warm-up: backbone, routing and one task's detector, which is
what the precision and the engine change (resizing and the anomaly map cost the same for all).
Accuracy is the image AUROC that calibrate recorded per precision (TaskEntry.image_auroc, mean over
tasks); a precision without a record for every task ranks below the recorded ones, by bits
(fp32 > fp16 > int8). Ties go to the higher precision, then to the faster target; when nothing
meets the target the fastest candidate is chosen, with a LatencyTargetWarning.

Timings are cached in EXPORT/engines/latency.json per machine (host, OS, CPU, engine builds) and
for one export identity (the hashes of every graph and engine), so a line PC times once and a
re-exported model is timed again. Torch-free, like the rest of the runtime.
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from moleflow_edge.atomic import write_text_atomic
from moleflow_edge.contract import Manifest, Precision
from moleflow_edge.errors import EngineError, UserError
from moleflow_edge.runtime.backend import BackendError
from moleflow_edge.runtime.options import RuntimeOptions
from moleflow_edge.targets import (
    ONNXRUNTIME_DISTRIBUTIONS,
    TARGETS,
    Backend,
    ExportFormat,
    Target,
    installed,
    not_installed,
    resolve_backend,
)


class Timeable(Protocol):
    """What timing a candidate needs of a loaded export (the Runtime is one); a context manager."""

    @property
    def image_size(self) -> int: ...

    @property
    def tasks(self) -> list[str]: ...

    @property
    def provider(self) -> str | None: ...

    def score_as(self, resized: np.ndarray, task: str) -> tuple[np.ndarray, np.ndarray]: ...

    def __enter__(self) -> Timeable: ...

    def __exit__(self, *exc: object) -> None: ...


__all__ = ["Candidate", "EngineChoice", "LatencyTargetWarning", "Timeable", "choose", "select_engine"]

LATENCY_CACHE = "engines/latency.json"
CACHE_FORMAT = 1
WARMUP_FRAMES = 3  # first runs pay for session setup, lazy detector loading and allocator growth
TIMED_FRAMES = 10  # the median of these is the candidate's latency
ENGINE_DISTRIBUTIONS = (*ONNXRUNTIME_DISTRIBUTIONS, "openvino", "tensorrt")

Clock = Callable[[], float]  # seconds from a monotonic clock (time.perf_counter; tests pass a fake)


class LatencyTargetWarning(UserWarning):
    """No precision or target of the export meets the latency target here; the fastest runs."""


@dataclass(frozen=True)
class Candidate:
    """One way to run the export: a deployment target at one precision."""

    target: Target
    precision: Precision

    @property
    def key(self) -> str:
        return f"{self.target.name}/{self.precision.value}"


@dataclass
class EngineChoice:
    """What latency-target selection chose and why, for the run's start-up line and the API."""

    target_ms: float
    chosen: Candidate
    met: bool  # False: nothing met the target and the fastest was chosen
    reason: str
    accuracy: dict[Precision, float | None]  # precision -> recorded mean image AUROC (None: not recorded)
    ms: dict[str, float]  # candidate key -> median ms per frame at batch 1
    failed: dict[str, str] = field(default_factory=dict)  # candidate key -> why it could not be timed
    cached: bool = False  # every timing came from engines/latency.json
    cache_error: str | None = None  # why the timings could not be written (a read-only export)
    note: str | None = None  # e.g. thresholds calibrated at another precision

    def as_dict(self) -> dict[str, object]:
        """For run's JSON summary line."""
        return {
            "target_ms": self.target_ms, "chosen": self.chosen.key, "met": self.met, "reason": self.reason,
            "ms": {k: round(v, 3) for k, v in self.ms.items()}, "image_auroc": self.accuracy, "failed": self.failed,
            "cached": self.cached,
        }  # fmt: skip

    def summary(self) -> str:
        auc = self.accuracy[self.chosen.precision]
        accuracy = "no recorded accuracy" if auc is None else f"image AUROC {auc:.4f}"
        source = "cached timings" if self.cached else "timed now"
        chosen = (
            f"latency target {self.target_ms:g} ms: chose {self.chosen.key} "
            f"({self.ms[self.chosen.key]:.2f} ms/frame in the engines at batch 1, {accuracy}): {self.reason}"
        )
        timings = ", ".join(f"{key} {ms:.2f} ms" for key, ms in sorted(self.ms.items(), key=lambda i: i[1]))
        lines = [chosen, f"  {source}: {timings}"]
        lines += [f"  could not time {key}: {why}" for key, why in self.failed.items()]
        lines += [f"  timings not cached: {self.cache_error}"] if self.cache_error else []
        lines += [f"  note: {self.note}"] if self.note else []
        return "\n".join(lines)


# --- what can run ------------------------------------------------------------------------------------
def candidates(manifest: Manifest, backend: Backend | str, precision: Precision | None) -> list[Candidate]:
    """Installed targets (all of ``backend``'s, or the one named) x the precisions the export holds
    for them (``precision`` alone when given); BackendError says why there is none."""
    name = getattr(backend, "value", backend)
    kind, _ = resolve_backend(name)  # refuses an unknown name
    why: list[str] = []
    found: list[Candidate] = []
    for row in TARGETS:
        if kind is not Backend.AUTO and name not in (row.name, row.backend.value):
            continue
        if (reason := not_installed(row)) is not None:
            why.append(f"{row.name}: {reason}")
            continue
        wanted = [p for p in row.precisions if precision in (None, p)]
        held = [p for p in wanted if _exported(manifest, row, p)]
        if not held:
            what = "TensorRT engines" if row.export_format is ExportFormat.ENGINE else "ONNX graphs"
            why.append(f"{row.name}: the export has no {what} at {', '.join(p.value for p in wanted)}")
        found += [Candidate(row, p) for p in held]
    if not found:
        raise BackendError("no precision or target of this export can run here: " + "; ".join(why))
    return found


def _exported(manifest: Manifest, row: Target, precision: Precision) -> bool:
    """Does the export hold what ``row`` runs, at ``precision``, for the backbone and every task?"""
    if row.export_format is ExportFormat.ENGINE:  # built for which GPU is checked when it loads
        p = precision.value  # engine keys: "backbone.<precision>/<device>", "<precision>/<device>"
        return any(k.startswith(f"backbone.{p}/") for k in manifest.engines) and all(
            any(k.startswith(f"{p}/") for k in entry.engines) for entry in manifest.tasks
        )
    return precision in manifest.backbone_graphs and all(precision in entry.graphs for entry in manifest.tasks)


def recorded_accuracy(manifest: Manifest, precision: Precision) -> float | None:
    """Mean image AUROC over tasks that calibrate recorded at ``precision``; None unless every task has one
    (a mean over some tasks would not compare with another precision's)."""
    scores = [entry.image_auroc.get(precision) for entry in manifest.tasks]
    known = [s for s in scores if s is not None]
    if not scores or len(known) < len(scores):
        return None
    return float(np.mean(known))


# --- choosing ----------------------------------------------------------------------------------------
def choose(
    timed: Sequence[Candidate], ms: dict[str, float], accuracy: dict[Precision, float | None], target_ms: float
) -> tuple[Candidate, bool, str]:
    """(chosen, met, why): the most accurate of the ``timed`` candidates within ``target_ms``, else the fastest."""
    order = list(Precision)

    def rank(c: Candidate) -> tuple[bool, float, int, float]:
        auc = accuracy[c.precision]
        return auc is not None, auc or 0.0, -order.index(c.precision), -ms[c.key]

    meeting = [c for c in timed if ms[c.key] <= target_ms]
    if not meeting:
        fastest = min(timed, key=lambda c: ms[c.key])
        return fastest, False, f"nothing meets {target_ms:g} ms here; the fastest of {len(timed)} candidate(s) runs"
    best = max(meeting, key=rank)
    if accuracy[best.precision] is not None:
        basis = "by the image AUROC calibrate recorded"
    else:
        basis = (
            f"no image AUROC recorded at {best.precision.value} for every task, so ranked by precision "
            f"(fp32 > fp16 > int8); moleflow-edge calibrate --precision P records it"
        )
    return best, True, f"the most accurate of {len(meeting)} candidate(s) within {target_ms:g} ms, {basis}"


def time_candidate(runtime: Timeable, clock: Clock) -> float:
    """Median ms per frame at batch 1 of backbone, routing and the first task's detector, after warm-up."""
    size = runtime.image_size
    image = np.random.default_rng(0).integers(0, 256, (1, size, size, 3), dtype=np.uint8)
    task = runtime.tasks[0]
    for _ in range(WARMUP_FRAMES):
        runtime.score_as(image, task)
    samples = []
    for _ in range(TIMED_FRAMES):
        started = clock()
        runtime.score_as(image, task)
        samples.append((clock() - started) * 1e3)
    return float(np.median(samples))


def select_engine(
    root: Path,
    manifest: Manifest,
    options: RuntimeOptions,
    open_candidate: Callable[[Candidate], Timeable],
    *,
    clock: Clock,
) -> EngineChoice:
    """Time (or read the cached timings of) every candidate that ``options`` allow (its backend, and
    its precision when given) and choose one against its latency target; see the module docstring.

    ``open_candidate`` loads the export as one candidate (Runtime.load passes its own opener), so
    choosing comes before loading the choice."""
    assert options.latency_target_ms is not None
    target_ms = options.latency_target_ms
    found = candidates(manifest, options.backend, options.precision)  # type: ignore[arg-type]
    machine, identity = machine_key(), export_identity(manifest)
    cache = read_cache(root)
    known = _cached_ms(cache["machines"].get(machine), identity)
    ms = {c.key: known[c.key] for c in found if c.key in known}
    to_time = [c for c in found if c.key not in ms]
    failed: dict[str, str] = {}
    for c in to_time:
        try:
            with open_candidate(c) as runtime:
                if c.target.provider is not None and runtime.provider != c.target.provider:
                    raise BackendError(f"onnxruntime fell back to {runtime.provider}")
                ms[c.key] = time_candidate(runtime, clock)
        except (
            EngineError,
            UserError,
            RuntimeError,
            OSError,
        ) as exc:  # BackendError, ManifestError, an engine's own errors
            failed[c.key] = str(exc)
    cache_error = None
    if any(c.key in ms for c in to_time):  # something was timed now: keep it for the next load
        entry = {"export": identity, "warmup": WARMUP_FRAMES, "frames": TIMED_FRAMES, "ms": {**known, **ms}}
        cache["machines"][machine] = entry
        try:
            write_text_atomic(root / LATENCY_CACHE, json.dumps(cache, indent=2, sort_keys=True) + "\n")
        except OSError as exc:
            cache_error = str(exc)
    timed = [c for c in found if c.key in ms]
    accuracy = {p: recorded_accuracy(manifest, p) for p in Precision if any(c.precision is p for c in found)}
    if not timed:
        raise BackendError("no candidate could be timed: " + "; ".join(f"{k}: {why}" for k, why in failed.items()))
    chosen, met, reason = choose(timed, ms, accuracy, float(target_ms))
    return EngineChoice(
        float(target_ms), chosen, met, reason, accuracy, {c.key: ms[c.key] for c in timed}, failed, not to_time,
        cache_error, _threshold_note(manifest, chosen.precision),
    )  # fmt: skip


def _threshold_note(manifest: Manifest, precision: Precision) -> str | None:
    """Thresholds are per precision: tasks calibrated at others only get no decision at the chosen one."""
    missing = [e.name for e in manifest.tasks if e.thresholds and precision not in e.thresholds]
    if not missing:
        return None
    return (
        f"{', '.join(missing)} have thresholds only at other precisions, so their frames get no decision at "
        f"{precision.value}: run moleflow-edge calibrate --precision {precision.value}"
    )


# --- the per-machine cache -----------------------------------------------------------------------------
def machine_key() -> str:
    """Who timed: host, OS, CPU and the installed engine builds; another machine or engine version re-times."""
    engines = [f"{d} {v}" for d in ENGINE_DISTRIBUTIONS if (v := installed(d))]
    return " | ".join([platform.node(), f"{platform.system()} {platform.machine()}", cpu_name(), *engines])


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (x86 "model name", ARM "Hardware"/"Model"), else what platform says."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Hardware", "Model") and value.strip():
            return value.strip()
    return platform.processor() or platform.machine()


def export_identity(manifest: Manifest) -> str:
    """A hash of the model and every graph and engine the manifest lists: a re-export changes it,
    a calibration (thresholds, AUROC) does not."""
    files = sorted(f"{name}:{sha}" for artifact in manifest.artifacts() for name, sha in artifact.paths())
    return hashlib.sha256("\n".join([manifest.model_sha256, *files]).encode()).hexdigest()


def _cached_ms(entry: object, identity: str) -> dict[str, float]:
    """A machine's cached timings when they were taken on this export, else none."""
    if not isinstance(entry, dict) or entry.get("export") != identity or not isinstance(entry.get("ms"), dict):
        return {}
    return {k: float(v) for k, v in entry["ms"].items() if isinstance(v, (int, float)) and v > 0}


def read_cache(root: Path) -> dict:
    """engines/latency.json, or an empty cache when it is missing, damaged or of another format."""
    try:
        data = json.loads((root / LATENCY_CACHE).read_text())
    except (OSError, ValueError):
        data = None
    ok = isinstance(data, dict) and data.get("format") == CACHE_FORMAT and isinstance(data.get("machines"), dict)
    return data if ok else {"format": CACHE_FORMAT, "machines": {}}
