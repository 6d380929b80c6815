"""How routing time, memory and load times grow with the number of tasks in an export.

Synthetic: each count is a copy of the export whose tasks all use the first task's fp32 detector
graph, with prototypes perturbed from its own, so the router is what grows and no model is
trained for it. The grown export is made as the exporter makes one: the contract's Manifest and
TaskEntry, router.safetensors written by router.router_weights under its content name, and
checked by the runtime's load like any export. It has no router graph (router.onnx is built with
torch, which the benchmark does without), so every backend routes with the numpy router the rows
time; the copied graph, made for the original tasks, would give the wrong number of distances.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from moleflow_edge.bench.machine import rss_mb
from moleflow_edge.contract import (
    ROUTER_WEIGHTS,
    ArtifactFile,
    Manifest,
    Precision,
    TaskEntry,
    content_name,
    load_manifest,
    save_manifest,
)
from moleflow_edge.router import Prototype, router_weights
from moleflow_edge.signing import SIGNED_MARKER

TASK_COUNTS = (1, 5, 15, 50)


def task_growth(export_dir: str | Path, counts: Sequence[int] = TASK_COUNTS, iters: int = 50) -> list[dict]:
    """Routing time, memory and load times for exports of 1, 5, 15, 50 tasks (one row per count)."""
    from safetensors.numpy import load_file

    from moleflow_edge.runtime import Backend, Runtime, RuntimeOptions

    root = Path(export_dir)
    manifest = load_manifest(root)
    base = manifest.tasks[0]
    tensors = load_file(str(root / manifest.router_file.file))  # type: ignore[union-attr]
    mean, whitener = tensors[f"{base.name}.mean"], tensors[f"{base.name}.whitener"]
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_tasks_") as tmp:
        for count in counts:
            work = Path(tmp) / str(count)
            # a grown copy is unsigned by design: it leaves the signers' marker out with the engines
            shutil.copytree(root, work, ignore=shutil.ignore_patterns("engines", SIGNED_MARKER))
            names = [f"task{i:03d}" for i in range(count)]
            prototypes = {
                name: Prototype((mean + 0.1 * i * rng.standard_normal(mean.shape)).astype(np.float32), whitener, np.inf)
                for i, name in enumerate(names)
            }
            m = _grown_manifest(work, manifest, base, names, prototypes)
            before = rss_mb()
            started = time.perf_counter()
            runtime = Runtime.load(work, RuntimeOptions(Backend.ONNXRUNTIME, "fp32", max_resident_tasks=None))
            load_ms = (time.perf_counter() - started) * 1e3
            engine_ms = []
            for name in names:
                engine_ms.append(runtime.engines.get(name)[1] * 1e3)
            features = rng.standard_normal((8, m.routing_dim)).astype(np.float32)
            routing = []
            for _ in range(iters):
                started = time.perf_counter()
                runtime.router.assign(runtime.router.distances(features[:1]))
                routing.append((time.perf_counter() - started) * 1e3)
            rows.append(
                {
                    "tasks": count,
                    "runtime_load_ms": round(load_ms, 2),
                    "engine_load_ms_mean": round(float(np.mean(engine_ms)), 3),
                    "all_engines_load_ms": round(float(np.sum(engine_ms)), 2),
                    "routing_ms_p50": round(float(np.median(routing)), 4),
                    "rss_increase_mb": round(rss_mb() - before, 1),
                    "router_mb": round((work / m.router_file.file).stat().st_size / 2**20, 2),  # type: ignore[union-attr]
                }
            )
            runtime.close()
    return rows


def _grown_manifest(
    work: Path, manifest: Manifest, base: TaskEntry, names: list[str], prototypes: dict[str, Prototype]
) -> Manifest:
    """``manifest`` with ``names`` as its tasks, each on ``base``'s fp32 detector graph with its own
    prototype and no unknown-product limit (so every frame routes), saved in the copy ``work``.
    Engines are dropped (the copy leaves engines/ out)."""
    data = router_weights(names, prototypes)
    sha = hashlib.sha256(data).hexdigest()
    router = ArtifactFile(content_name(ROUTER_WEIGHTS, sha), sha)
    (work / router.file).write_bytes(data)
    fp32 = {Precision.FP32: base.graphs[Precision.FP32]}
    tasks = [TaskEntry(name, dict(fp32), distance_limit=prototypes[name].limit) for name in names]
    grown = dataclasses.replace(manifest, router_file=router, router_graph=None, tasks=tasks, engines={})
    save_manifest(work, grown)
    return grown
