"""The pipelines under test, and which one a backend name makes.

A pipeline takes a list of BGR frames (H,W,3 uint8) and returns the milliseconds of each stage
of that call and (task, image score) per frame. Every one is a Runtime: over the PyTorch eager
reference (the trained model through moleflow_edge/torch_backend.py) or over an export on a
deployment target of the table (moleflow_edge/targets.py); one that cannot run here comes back
with the reason instead of a pipeline. benchmarks/runtime_bench.py times the same pipelines.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from moleflow_edge.bench.machine import has_int8_dot_product
from moleflow_edge.contract import Manifest
from moleflow_edge.targets import TARGET_NAMES, ExportFormat, not_installed, target

EAGER = "torch-eager"  # the trained model in PyTorch: the reference every target is held to
BACKENDS = (EAGER, *TARGET_NAMES)

Pipeline = Callable[[list[np.ndarray]], tuple[dict[str, float], list[tuple[str, float | None]]]]


def runtime_pipeline(runtime: object) -> Pipeline:
    """A Runtime as a pipeline: per-call stage milliseconds (batch stages once, per-frame ones summed)."""

    def run(frames: list[np.ndarray]) -> tuple[dict[str, float], list[tuple[str, float | None]]]:
        results = runtime.infer(frames)  # type: ignore[attr-defined]
        first = results[0].timings
        ms = {
            "preprocess": sum(r.timings.preprocess for r in results),
            "backbone": first.backbone,
            "routing": first.routing,
            "detector": sum({r.task: r.timings.detector for r in results}.values()),  # one call per task group
            "postprocess": sum(r.timings.postprocess for r in results),
        }
        return ms, [(r.task, r.image_score) for r in results]

    return run


def make_pipeline(
    backend: str,
    precision: str,
    root: Path,
    manifest: Manifest,
    model_dir: Path | None,
    threads: int | None,
    route_all: bool = False,
) -> tuple[Pipeline | None, Callable[[], None], str | None, str | None]:
    """(pipeline, close, skip reason, warning) for one backend and precision. ``route_all`` lifts
    every task's unknown-product limit, so that frames of no known product still reach a detector."""
    from moleflow_edge.runtime import Runtime, RuntimeOptions

    def nothing() -> None:
        return None

    if precision not in manifest.backbone_graphs and backend != EAGER:
        return None, nothing, f"the export has no {precision} graphs (export with --precision {precision})", None
    if backend == EAGER:
        if precision != "fp32":
            return None, nothing, "torch eager runs the trained fp32 weights only", None
        if model_dir is None:
            return None, nothing, "needs the model directory (--model DIR)", None
        try:
            import torch  # noqa: F401
        except ImportError:
            return None, nothing, "torch is not installed (pip install moleflow-edge[train])", None
        from moleflow_edge.torch_backend import model_runtime

        eager = model_runtime(model_dir)
        if route_all:
            eager.router.limits[:] = np.inf
        return runtime_pipeline(eager), eager.close, None, None
    if backend not in TARGET_NAMES:
        return None, nothing, f"unknown backend; choose from {', '.join(BACKENDS)}", None
    row = target(backend)
    reason = not_installed(row)
    if reason is not None:
        return None, nothing, reason, None
    if row.export_format is ExportFormat.ENGINE and not manifest.engines:
        return None, nothing, "the export has no TensorRT engines (export --format engine on the target GPU)", None
    warning = None
    if row.name == "onnxruntime-cpu" and precision == "int8" and not has_int8_dot_product():
        warning = (
            "CPU without VNNI/dot-product: onnxruntime's fused u8s8 INT8 kernels saturate 16-bit sums, "
            "so these INT8 scores are wrong as well as slow (benchmarks/README.md); deploy fp32 here"
        )
    runtime = Runtime.load(root, RuntimeOptions(row.name, precision, threads=threads))
    if route_all:
        runtime.router.limits[:] = np.inf
    return runtime_pipeline(runtime), runtime.close, None, warning
