"""bench(): one export through every backend x precision x batch, as one table and one JSON report.

The package docstring (moleflow_edge/bench/__init__.py) lists what the report holds; this module
runs the parts in order and applies the AUROC floor that makes the benchmark a regression check.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from moleflow_edge.atomic import check_writable
from moleflow_edge.bench.graph_cost import export_size_mb, flop_report
from moleflow_edge.bench.machine import machine_info, onnxruntime_peak, peak_rss_mb, reset_peak_rss
from moleflow_edge.bench.measure import image_auroc, load_test_frames, measure, score_all
from moleflow_edge.bench.pipelines import BACKENDS, EAGER, make_pipeline
from moleflow_edge.bench.tables import markdown_table, save_chart, summary_table
from moleflow_edge.bench.task_growth import TASK_COUNTS, task_growth
from moleflow_edge.contract import Manifest, load_manifest
from moleflow_edge.errors import MoleflowError

ROUTING_NOTE = (
    "no --data: 16 random frames, which match no product; unknown-product limits are lifted so that "
    "each frame is routed to its nearest task and its detector runs (timing only, no AUROC)"
)


class BenchError(MoleflowError):
    """A benchmark result below the requested floor (a regression), or nothing could run."""


def bench(
    export_dir: str | Path,
    backends: Sequence[str] = BACKENDS,
    precisions: Sequence[str] = ("fp32", "int8"),
    batches: Sequence[int] = (1, 8),
    iters: int = 30,
    data_root: str | Path | None = None,
    model_dir: str | Path | None = None,
    auroc_floor: float | None = None,
    *,
    threads: int | None = None,
    task_counts: Sequence[int] = TASK_COUNTS,
    chart: str | Path | None = None,
    printer: Callable[[str], None] | None = print,
) -> dict:
    """Benchmark the export; returns the JSON-ready report.

    Keys: machine, export, iters, results (one row per backend x precision x batch: stages_ms and
    end_to_end_ms as {p50, p90, p99}, throughput_fps, peak_rss_mb, image_auroc, warning where
    flagged), skipped ({backend, precision, reason}), summary (the printed table's rows), flops,
    peak (what flops' fraction_of_peak is a share of, and what it was measured with), task_growth,
    chart (the PNG path, or why none was written). ``backends`` defaults to every backend known, so
    that the missing GPU ones are listed as skipped with the reason.

    ``auroc_floor``: raise BenchError when a backend that ran scores below it (a regression check).
    ``chart``: write a PNG of stacked per-stage latency (needs matplotlib; skipped with a note without).
    """
    root = Path(export_dir)
    manifest = load_manifest(root)
    model = None if model_dir is None else Path(model_dir)
    data = None if data_root is None else Path(data_root)
    machine = machine_info(threads)
    if chart is not None:
        check_writable(chart, "--chart", directory=False)
    frames, true_tasks, labels = load_test_frames(data, manifest.task_names, manifest.image_size)
    results: list[dict] = []
    skipped: list[dict] = []
    summary: list[dict] = []
    for backend in backends:
        for precision in precisions:
            reset_peak_rss()
            pipeline, close, reason, warning = make_pipeline(
                backend, precision, root, manifest, model, threads, route_all=data is None
            )
            if pipeline is None:
                skipped.append({"backend": backend, "precision": precision, "reason": reason})
                continue
            try:
                accuracy = image_auroc(true_tasks, labels, score_all(pipeline, frames)) if data else None
                for batch in batches:
                    row = {"backend": backend, "precision": precision, "batch": batch}
                    row.update(measure(pipeline, frames, batch, iters))
                    row["peak_rss_mb"] = round(peak_rss_mb(), 1)
                    row["image_auroc"] = None if accuracy is None else round(accuracy, 4)
                    if row["stages_ms"]["detector"]["p50"] == 0.0:  # no detector ran: not an end-to-end time
                        warning = (
                            "no frame reached a detector (all unknown products): end-to-end leaves the detector out"
                        )
                    if warning:
                        row["warning"] = warning
                    results.append(row)
            finally:
                close()
            size = _size_for(backend, precision, root, manifest, model)
            first = next(r for r in results if r["backend"] == backend and r["precision"] == precision)
            summary.append(
                {
                    "backend": backend,
                    "precision": precision,
                    "status": "warn" if warning else "ok",
                    "size_mb": size,
                    "image_auroc": first["image_auroc"],
                    "ms_per_image": round(first["end_to_end_ms"]["p50"] / first["batch"], 2),
                    "fps": first["throughput_fps"],
                }
            )
    for s in skipped:
        summary.append({**s, "status": "skipped"})  # with the reason, which the table prints
    reference = next((r for r in results if r["backend"] == "onnxruntime-cpu" and r["precision"] == "fp32"
                      and r["batch"] == 1), None)  # fmt: skip
    stage_p50 = None if reference is None else {s: v["p50"] for s, v in reference["stages_ms"].items()}
    flops, peak = flop_report(root, manifest, stage_p50, onnxruntime_peak(threads))  # as the stages ran
    report = {
        "machine": machine,
        "export": str(root),
        "iters": iters,
        "results": results,
        "skipped": skipped,
        "summary": summary,
        "flops": flops,
        "peak": peak,  # {gflops, measured_with, note}: what every fraction_of_peak is a share of
        "task_growth": task_growth(root, task_counts) if task_counts else [],
    }
    report["chart"] = save_chart(results, chart) if chart else None
    report["frames"] = "labelled test images of --data" if data is not None else ROUTING_NOTE
    if printer is not None:
        if data is None:
            printer(f"note: {ROUTING_NOTE}")
        printer(summary_table(summary))
        printer(markdown_table(results))
        for row in report["flops"]:
            if "gflop" in row:
                share = f", {100 * row['fraction_of_peak']:.1f}% of peak" if "fraction_of_peak" in row else ""
                printer(f"FLOPs {row['graph']}: {row['gflop']:.3f} GFLOP/image{share}")
        if peak is not None:
            printer(f"peak: {peak['gflops']:.1f} GFLOP/s fp32, {peak['measured_with']}"
                    + (f" ({peak['note']})" if peak["note"] else ""))  # fmt: skip
        for row in report["task_growth"]:
            printer(f"tasks {row['tasks']}: {json.dumps({k: v for k, v in row.items() if k != 'tasks'})}")
    if auroc_floor is not None:
        low = [r for r in summary if r.get("image_auroc") is not None and r["image_auroc"] < auroc_floor]
        if data is None:
            raise BenchError("an AUROC floor needs labelled test images: pass --data ROOT")
        if low:
            names = ", ".join(f"{r['backend']} {r['precision']} ({r['image_auroc']:.4f})" for r in low)
            raise BenchError(f"image AUROC below the floor {auroc_floor}: {names}")
    return report


def _size_for(backend: str, precision: str, root: Path, manifest: Manifest, model: Path | None) -> float | None:
    if backend == EAGER:
        if model is None:
            return None
        return round(sum(p.stat().st_size for p in model.glob("*.safetensors")) / 2**20, 2)
    return export_size_mb(root, manifest, precision)
