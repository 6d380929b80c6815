"""The frames a benchmark runs, how long a pipeline takes on them, and how well it scores them.

Timing is per call, on consecutive batches, after a warm-up; accuracy is end to end, so a frame
the router sends to the wrong product counts against the backend that routed it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from moleflow_edge.bench.pipelines import Pipeline
from moleflow_edge.metrics import auroc
from moleflow_edge.runtime.result import STAGES

PERCENTILES = (50, 90, 99)


def load_test_frames(data_root: Path | None, tasks: list[str], size: int) -> tuple[list[np.ndarray], list, np.ndarray]:
    """Labelled test frames of the export's tasks, interleaved by task: frames, true tasks, labels.

    Without a dataset: 16 random frames (timing only, no AUROC; bench lifts the routing limits so
    that they reach a detector, see run.ROUTING_NOTE).
    """
    if data_root is None:
        rng = np.random.default_rng(0)
        frames = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(16)]
        return frames, [None] * 16, np.zeros(16, int)
    from moleflow_edge.data.mvtec import test_samples
    from moleflow_edge.preprocess import read_image_bgr

    per_task = [[(task, s) for s in test_samples(data_root, task)] for task in tasks]
    order = [item for group in _interleave(per_task) for item in group]
    frames = [read_image_bgr(s.path) for _, s in order]
    return frames, [t for t, _ in order], np.array([s.label for _, s in order])


def _interleave(groups: list[list]) -> list[list]:
    longest = max(len(g) for g in groups)
    return [[g[i] for g in groups if i < len(g)] for i in range(longest)]


def image_auroc(true_tasks: list, labels: np.ndarray, outputs: list[tuple[str, float | None]]) -> float | None:
    """Mean over tasks of the image AUROC, end to end: a frame routed elsewhere or unknown counts as flagged."""
    if not true_tasks or true_tasks[0] is None:
        return None
    values = []
    for task in dict.fromkeys(true_tasks):
        idx = [i for i, t in enumerate(true_tasks) if t == task]
        finite = [outputs[i][1] for i in idx if outputs[i][0] == task and outputs[i][1] is not None]
        top = max(finite, default=0.0) + 1.0
        scores = [outputs[i][1] if outputs[i][0] == task and outputs[i][1] is not None else top for i in idx]
        if 0 < labels[idx].sum() < len(idx):
            values.append(auroc(labels[idx], np.array(scores)))
    return float(np.mean(values)) if values else None


def _percentiles(values: list[float]) -> dict[str, float]:
    return {f"p{q}": round(float(np.percentile(values, q)), 3) for q in PERCENTILES}


def measure(pipeline: Pipeline, frames: list[np.ndarray], batch: int, iters: int, warmup: int = 2) -> dict:
    """Per-stage and end-to-end percentiles over ``iters`` calls on consecutive batches of ``frames``."""
    return measure_interleaved({"": pipeline}, frames, batch, iters, rounds=1, warmup=warmup)[""]


def measure_interleaved(
    pipelines: dict[str, Pipeline], frames: list[np.ndarray], batch: int, iters: int, rounds: int = 4, warmup: int = 1
) -> dict[str, dict]:
    """measure() of several pipelines in one run, by name: each makes ``iters`` timed calls, taking turns.

    The calls are made in ``rounds``: in each round every pipeline, in a rotating order, makes
    ``warmup`` untimed calls and then its next block of about iters/rounds timed ones. A change in
    machine load then hits every pipeline alike, and blocks (rather than alternating single calls)
    keep one engine's idle-spinning worker threads from slowing the next engine's call.
    """
    count = max(1, len(frames) // batch)
    batches = [[frames[(i * batch + j) % len(frames)] for j in range(batch)] for i in range(count)]
    names = list(pipelines)
    stages: dict[str, dict[str, list[float]]] = {n: {s: [] for s in STAGES} for n in names}
    walls: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            pipeline = pipelines[name]
            for k in range(warmup):  # first run, caches, thread wake-up: not counted
                pipeline(batches[k % len(batches)])
            for i in range(iters * r // rounds, iters * (r + 1) // rounds):
                started = time.perf_counter()
                ms, _ = pipeline(batches[i % len(batches)])
                walls[name].append((time.perf_counter() - started) * 1e3)
                for s in STAGES:
                    stages[name][s].append(ms[s])
    return {
        name: {
            "stages_ms": {s: _percentiles(v) for s, v in stages[name].items()},
            "end_to_end_ms": _percentiles(walls[name]),
            "throughput_fps": round(batch / statistics.median(walls[name]) * 1e3, 2),
        }
        for name in names
    }


def measure_calls(
    calls: dict[str, Callable[[], object]], iters: int, rounds: int = 4, warmup: int = 1
) -> dict[str, dict[str, float]]:
    """measure_interleaved() of calls that take no frames (one graph, one model call), by name: the
    percentiles of each call's milliseconds."""
    pipelines = {name: _call_pipeline(call) for name, call in calls.items()}
    measured = measure_interleaved(pipelines, [np.empty(0, np.uint8)], 1, iters, rounds, warmup)
    return {name: m["end_to_end_ms"] for name, m in measured.items()}


def _call_pipeline(call: Callable[[], object]) -> Pipeline:
    def run(frames: list[np.ndarray]) -> tuple[dict[str, float], list[tuple[str, float | None]]]:
        call()
        return dict.fromkeys(STAGES, 0.0), []

    return run


def score_all(pipeline: Pipeline, frames: list[np.ndarray], batch: int = 8) -> list[tuple[str, float | None]]:
    """(task, image score) for every frame, in order."""
    outputs: list[tuple[str, float | None]] = []
    for i in range(0, len(frames), batch):
        outputs += pipeline(frames[i : i + batch])[1]
    return outputs
