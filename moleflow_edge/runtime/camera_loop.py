"""`moleflow-edge run`: the frames of a source (runtime/sources.py) through an InferenceRuntime, one JSON
line per frame.

stdout gets one JSON object per frame (source, task, score, decision, latency per stage in
ms), or {"error": ...} for a frame that could not be read or processed, and a last line
{"summary": {...}}; stderr gets the same summary for people. A camera or stream that stops
delivering frames is reopened a bounded number of times, then the loop ends as LOST;
Ctrl-C ends it with the summary. How the loop ended is a RunOutcome; the command line says it
with an exit code (moleflow_edge/exit_codes.py).
"""

from __future__ import annotations

import json
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TextIO

from moleflow_edge.atomic import check_writable
from moleflow_edge.contract import ManifestError
from moleflow_edge.router import UNKNOWN
from moleflow_edge.runtime.backend import BackendError
from moleflow_edge.runtime.engine_select import LatencyTargetWarning
from moleflow_edge.runtime.inference_runtime import InferenceRuntime, ServerLost
from moleflow_edge.runtime.latency_stats import LatencyReservoir
from moleflow_edge.runtime.live_export import LiveExport
from moleflow_edge.runtime.options import RunOptions
from moleflow_edge.runtime.overlay import Viewer, render_overlay, write_png
from moleflow_edge.runtime.result import STAGES, FrameResult
from moleflow_edge.runtime.runtime import Runtime
from moleflow_edge.runtime.sources import CameraLost, SourceError, SourceFrame, iter_followed, iter_source


class RunOutcome(str, Enum):
    """How a run ended; each has its own exit code on the command line (README, run)."""

    DONE = "done"
    LOAD_FAILED = "load_failed"  # the export cannot be loaded (missing, tampered, no backend)
    SOURCE_UNREADABLE = "source_unreadable"  # the source cannot be opened or holds no image
    LOST = "lost"  # a camera, a stream or the inference server (run --server) stopped and did not come back
    ENGINE_FAILED = "engine_failed"  # the inference engine failed mid-run (device lost, out of memory)
    ALL_FRAMES_FAILED = "all_frames_failed"  # frames were read, but not one of them could be processed
    INTERRUPTED = "interrupted"  # Ctrl-C, after the summary


# --- the loop ------------------------------------------------------------------------------------
@dataclass
class LoopStats:
    """Counts and latencies over a run, for the summary; fixed memory however long the run."""

    frames: int = 0
    errors: int = 0
    unknown: int = 0
    per_task: dict[str, dict[str, int]] = field(default_factory=dict)
    latencies: dict[str, LatencyReservoir] = field(
        default_factory=lambda: {s: LatencyReservoir() for s in (*STAGES, "total")}
    )
    started: float = field(default_factory=time.perf_counter)
    interrupted: bool = False

    def add(self, result: FrameResult) -> None:
        self.frames += 1
        if result.error is not None:
            self.errors += 1
            return
        if result.task == UNKNOWN:
            self.unknown += 1
        else:
            counts = self.per_task.setdefault(result.task, {"frames": 0, "anomalies": 0})  # type: ignore[arg-type]
            counts["frames"] += 1
            counts["anomalies"] += int(bool(result.is_anomaly))
        for stage in STAGES:
            self.latencies[stage].add(getattr(result.timings, stage))
        self.latencies["total"].add(result.timings.total)

    def add_error(self) -> None:
        self.frames += 1
        self.errors += 1

    def summary(self, runtime: InferenceRuntime | None, outcome: RunOutcome) -> dict[str, object]:
        wall = time.perf_counter() - self.started
        processed = self.frames - self.errors
        return {
            "frames": self.frames,
            "processed": processed,
            "errors": self.errors,
            "unknown": self.unknown,
            "anomalies": sum(c["anomalies"] for c in self.per_task.values()),
            "tasks": self.per_task,
            "latency_ms": {stage: v.percentiles() for stage, v in self.latencies.items()},
            "wall_s": round(wall, 3),
            "frames_per_s": round(processed / wall, 2) if wall > 0 else None,
            "backend": None if runtime is None else runtime.description,
            "precision": None if runtime is None else runtime.precision.value,
            "latency_target": None
            if runtime is None or runtime.engine_choice is None
            else runtime.engine_choice.as_dict(),
            "engines": None if runtime is None else runtime.engine_stats.as_dict(),
            "calibration": None if runtime is None else runtime.task_status(),
            "failed_tasks": None if runtime is None else runtime.load_failures,
            "interrupted": self.interrupted,
            "outcome": outcome.value,
        }


def _human_summary(summary: dict) -> str:
    lines = [
        f"moleflow-edge run: {summary['frames']} frames ({summary['processed']} processed, {summary['errors']} errors, "
        f"{summary['unknown']} unknown product) in {summary['wall_s']} s, {summary['frames_per_s']} frames/s"
        + (f" on {summary['backend']}" if summary["backend"] else "")
    ]
    for task, counts in sorted(summary["tasks"].items()):
        lines.append(f"  {task}: {counts['frames']} frames, {counts['anomalies']} anomalous")
    total = summary["latency_ms"]["total"]
    if total:
        stages = ", ".join(
            f"{s} {summary['latency_ms'][s]['p50']:.2f}" for s in STAGES if summary["latency_ms"][s] is not None
        )
        lines.append(f"  latency ms: p50 {total['p50']:.2f}  p90 {total['p90']:.2f}  p99 {total['p99']:.2f}")
        lines.append(f"  p50 per stage (ms): {stages}")
    if summary["interrupted"]:
        lines.append("  interrupted (Ctrl-C)")
    return "\n".join(lines)


def run_source(
    source: str,
    options: RunOptions,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
    runtime: InferenceRuntime | None = None,
) -> RunOutcome:
    """Run every frame of ``source`` (folder, image, video, camera:N, stream URL, GStreamer pipeline)
    through ``options.export_dir`` as ``options`` say (runtime/options.py).

    Args:
        source: what runtime/sources.py reads.
        options: the export, how to load it, overlays, batch size, retries, ``check``, ``follow``.
        out: one JSON line per frame and a final {"summary": ...} line (default stdout).
        err: start-up lines, warnings and the summary for people (default stderr).
        runtime: a loaded InferenceRuntime to use (a Runtime, or a serving.RemoteRuntime): then
            ``options.runtime`` is unused and no newly committed export is picked up.

    Returns:
        How the run ended (RunOutcome; the CLI's exit code). Frames that fail alone are error lines.
        A latency target picks the precision and target (Runtime.load) and says which, and why, on ``err``.
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    export_dir, save_dir = options.export_dir, options.save_dir
    if save_dir is not None:
        check_writable(save_dir, "--save", directory=True)
    stats = LoopStats()
    outcome = RunOutcome.DONE
    warn = lambda m: print(f"warning: {m}", file=err)  # noqa: E731
    live: LiveExport | None = None
    if runtime is None:
        try:
            with warnings.catch_warnings():  # a missed target is said once, below, as a warning line
                warnings.simplefilter("ignore", LatencyTargetWarning)
                loaded = Runtime.load(export_dir, options.runtime)
        except (ManifestError, BackendError, ValueError, OSError) as exc:
            print(f"error: cannot load the export {export_dir}: {exc}", file=err)
            summary = stats.summary(None, RunOutcome.LOAD_FAILED)
            print(json.dumps({"summary": summary}), file=out, flush=True)
            return RunOutcome.LOAD_FAILED
        runtime = loaded
        live = LiveExport(loaded, warn)  # a newly committed export is picked up between batches
    active: InferenceRuntime = runtime

    choice = active.engine_choice
    if choice is not None:
        print(("" if choice.met else "warning: ") + choice.summary(), file=err)
    for task, status in active.task_status().items():
        print(f"task {task}: {status}", file=err)
    if active.uncalibrated:
        print(
            f"warning: {', '.join(active.uncalibrated)} not calibrated at {active.precision.value}: frames get a "
            "score but no decision (is_anomaly null); run moleflow-edge calibrate --export DIR --data ROOT "
            f"--precision {active.precision.value}",
            file=err,
        )
    if options.check:
        try:
            active.check_graphs()
        except BackendError as exc:
            print(f"error: --check: {exc}", file=err)
            print(json.dumps({"summary": stats.summary(active, RunOutcome.ENGINE_FAILED)}), file=out, flush=True)
            if live is not None:  # a runtime given by the caller stays the caller's to close
                live.close()
            return RunOutcome.ENGINE_FAILED

    save = Path(save_dir) if save_dir is not None else None
    if save is not None:
        save.mkdir(parents=True, exist_ok=True)
    viewer = Viewer(err) if options.show else None

    def emit(line: dict) -> None:
        out.write(json.dumps(line) + "\n")
        out.flush()

    def process(batch: list[SourceFrame]) -> bool:
        """Run a batch (on a newly committed export, when one came); False when the viewer asked to stop."""
        nonlocal active
        keep_going = True
        if live is not None:
            active = live.current()
        results = active.infer([item.frame for item in batch])
        if live is not None:
            live.record([item.index for item in batch])
        for item, result in zip(batch, results, strict=True):
            stats.add(result)
            line: dict[str, object] = {"frame": item.index, "source": item.name}
            if result.error is not None:
                emit({**line, "error": result.error})
                continue
            fields = result.summary()
            fields.pop("index")
            line |= fields
            line["read_ms"] = round(item.read_ms, 3)
            if save is not None or viewer is not None:
                overlay = render_overlay(item.frame, result, max_side=active.max_map_side)  # type: ignore[arg-type]
                if save is not None:
                    target = save / f"{item.index:06d}_{_safe(item.stem)}.png"
                    try:
                        write_png(target, overlay)
                        line["overlay"] = str(target)
                    except OSError as exc:  # a full disk costs the overlay, not the inspection
                        line["overlay_error"] = str(exc)
                if viewer is not None:
                    keep_going = viewer.show(overlay) and keep_going
            emit(line)
        return keep_going

    pending: list[SourceFrame] = []
    try:
        frames = iter_followed(source) if options.follow else iter_source(
            source, options.camera_retries, options.retry_delay_s, warn)  # fmt: skip
        for item in frames:
            if item is None:  # a followed folder is quiet: score what waits, or look for a new export
                if pending:
                    batch, pending = pending, []
                    if not process(batch):
                        break
                elif live is not None:
                    active = live.current()
                continue
            if options.max_frames is not None and stats.frames + len(pending) >= options.max_frames:
                break
            if item.error is not None:
                stats.add_error()
                emit({"frame": item.index, "source": item.name, "error": item.error})
                continue
            pending.append(item)
            last = options.max_frames is not None and stats.frames + len(pending) >= options.max_frames
            if len(pending) >= options.batch_size or last:
                batch, pending = pending, []
                if not process(batch) or last:
                    break
        if pending:
            batch, pending = pending, []
            process(batch)
    except ServerLost as exc:  # the frames of the batch in flight got no answer
        print(f"error: {exc}", file=err)
        outcome = RunOutcome.LOST
    except SourceError as exc:  # CameraLost included: frames read before it are still reported
        print(f"error: {exc}", file=err)
        outcome = RunOutcome.LOST if isinstance(exc, CameraLost) else RunOutcome.SOURCE_UNREADABLE
        if pending:
            process(pending)
    except BackendError as exc:
        print(f"error: inference failed: {exc}", file=err)
        outcome = RunOutcome.ENGINE_FAILED
    except KeyboardInterrupt:
        stats.interrupted = True
        outcome = RunOutcome.INTERRUPTED
    finally:
        if viewer is not None:
            viewer.close()

    if active.load_failures and outcome is RunOutcome.DONE:  # some frames ran, but a listed graph is broken
        print(f"error: detector graphs failed: {active.load_failures}", file=err)
        outcome = RunOutcome.ENGINE_FAILED
    if outcome is RunOutcome.DONE and stats.frames and stats.errors == stats.frames:
        print(f"error: every frame failed ({stats.errors} of {stats.frames}); see the error lines", file=err)
        outcome = RunOutcome.ALL_FRAMES_FAILED
    summary = stats.summary(active, outcome)
    if live is not None:
        summary |= live.summary()
    emit({"summary": summary})
    print(_human_summary(summary), file=err)
    if live is not None:
        live.close()
    return outcome


def _safe(stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem) or "frame"
