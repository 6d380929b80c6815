"""`moleflow-edge bench`: every backend x precision x batch on one export, one table, one JSON.

Per combination: per-stage latency percentiles (preprocess, backbone, routing, flow,
postprocess) and end-to-end, throughput, peak RSS, image AUROC on the dataset's labelled
test images (when ``data_root`` is given); backends that cannot run here are listed under
``skipped`` with the reason. Also: FLOPs per graph against a machine peak measured in the
same run, and how routing time, memory and engine load time grow with the task count.

Torch is imported only for the torch-eager backend; everything else runs on the runtime.
The ultralytics habit: one printed table (backend, precision, status, size, metric, ms per
image, FPS), and a metric floor that turns the benchmark into a regression check.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from moleflow_edge.contract import (
    ArtifactFile,
    Manifest,
    TaskEntry,
    file_sha256,
    load_manifest,
    save_manifest,
)
from moleflow_edge.metrics import auroc
from moleflow_edge.atomic import check_writable
from moleflow_edge.runtime.result import STAGES
from moleflow_edge.targets import TARGET_NAMES, ExportFormat, target

__all__ = [
    "BACKENDS",
    "PAPER_LATENCY_MS",
    "BenchError",
    "TorchPipeline",
    "bench",
    "graph_macs",
    "markdown_table",
    "runtime_pipeline",
    "save_chart",
    "task_growth",
]

# the PyTorch eager reference and every deployment target of the table (moleflow_edge/targets.py);
# those that cannot run here are reported as skipped, with the reason
BACKENDS = ("torch-eager", *TARGET_NAMES)
PAPER_LATENCY_MS = 15.0  # the per-image latency target the MoLE-Flow edge papers report
PERCENTILES = (50, 90, 99)
TASK_COUNTS = (1, 5, 15, 50)
ROUTING_NOTE = (
    "no --data: 16 random frames, which match no product; unknown-product limits are lifted so that "
    "each frame is routed to its nearest task and its flow runs (timing only, no AUROC)"
)

Pipeline = Callable[[list[np.ndarray]], tuple[dict[str, float], list[tuple[str, float | None]]]]


class BenchError(RuntimeError):
    """A benchmark result below the requested floor (a regression), or nothing could run."""


# --- the pipelines under test (shared with benchmarks/runtime_bench.py) -------------------------
class TorchPipeline:
    """The eager PyTorch path, stage by stage, as evaluation runs it."""

    def __init__(self, model_dir: Path) -> None:
        import torch

        from moleflow_edge.model_store import ModelStore
        from moleflow_edge.router import RouterTable

        self.torch = torch
        self.model, prototypes = ModelStore(model_dir).load()
        self.table = RouterTable(self.model.tasks, [prototypes[t] for t in self.model.tasks])
        self.size = self.model.config.image_size

    def __call__(self, frames: list[np.ndarray]) -> tuple[dict[str, float], list[tuple[str, float | None]]]:
        from moleflow_edge.anomaly_map import anomaly_map
        from moleflow_edge.preprocess import resize_frame
        from moleflow_edge.router import UNKNOWN

        torch, model, cfg = self.torch, self.model, self.model.config
        ms: dict[str, float] = {}
        with torch.no_grad():
            t = time.perf_counter()
            x = torch.from_numpy(np.stack([resize_frame(f, self.size) for f in frames]))
            ms["preprocess"] = (time.perf_counter() - t) * 1e3
            t = time.perf_counter()
            maps = model.backbone_maps(x)
            routing = model.routing_feature(maps).numpy()
            embedded = model.embed(model.patch_concat(maps))
            ms["backbone"] = (time.perf_counter() - t) * 1e3
            t = time.perf_counter()
            tasks = self.table.route(self.table.distances(routing))
            ms["routing"] = (time.perf_counter() - t) * 1e3
            t = time.perf_counter()
            scores: list[float | None] = [None] * len(frames)
            patches: list[np.ndarray | None] = [None] * len(frames)
            for task in dict.fromkeys(tasks):
                if task == UNKNOWN:
                    continue
                idx = [i for i, k in enumerate(tasks) if k == task]
                patch = model.patch_scores(embedded[idx], task)
                image = model.image_score(patch)
                for j, i in enumerate(idx):
                    patches[i], scores[i] = patch[j].numpy(), float(image[j])
            ms["flow"] = (time.perf_counter() - t) * 1e3
            t = time.perf_counter()
            for frame, patch in zip(frames, patches):
                if patch is not None:
                    anomaly_map(patch, cfg.image_size, cfg.map_sigma, out_hw=frame.shape[:2])
            ms["postprocess"] = (time.perf_counter() - t) * 1e3
        return ms, list(zip(tasks, scores))


def runtime_pipeline(runtime: object) -> Pipeline:
    """A Runtime as a pipeline: per-call stage milliseconds (batch stages once, per-frame ones summed)."""

    def run(frames: list[np.ndarray]) -> tuple[dict[str, float], list[tuple[str, float | None]]]:
        results = runtime.infer(frames)  # type: ignore[attr-defined]
        first = results[0].timings
        ms = {
            "preprocess": sum(r.timings.preprocess for r in results),
            "backbone": first.backbone,
            "routing": first.routing,
            "flow": sum({r.task: r.timings.flow for r in results}.values()),  # one flow call per task group
            "postprocess": sum(r.timings.postprocess for r in results),
        }
        return ms, [(r.task, r.image_score) for r in results]

    return run


# --- machine -------------------------------------------------------------------------------------
def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def has_int8_dot_product() -> bool:
    """x86 VNNI (AVX512-VNNI or AVX-VNNI) or ARM dot-product: what onnxruntime's INT8 CPU kernels need."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "asimddp"})


def numpy_peak_gflops(size: int = 1024, repeats: int = 5) -> float:
    """Measured fp32 matmul GFLOP/s (best of ``repeats``): this machine's practical dense peak, now."""
    a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    b = a.T.copy()
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2.0 * size**3 / best / 1e9


def _timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def machine_info(threads: int | None) -> dict:
    import onnxruntime

    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": _cpu_name(),
        "cpus": os.cpu_count(),
        "threads": threads,
        "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "int8_dot_product": has_int8_dot_product(),
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_providers": onnxruntime.get_available_providers(),
        "numpy_matmul_gflops": round(numpy_peak_gflops(), 1),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        info["torch"] = None
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark for this process (Linux clear_refs), so a peak is per backend."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """VmHWM (peak resident set since the last reset) or, without /proc, the process's lifetime peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


# --- frames and accuracy -------------------------------------------------------------------------
def load_test_frames(data_root: Path | None, tasks: list[str], size: int) -> tuple[list[np.ndarray], list, np.ndarray]:
    """Labelled test frames of the export's tasks, interleaved by task: frames, true tasks, labels.

    Without a dataset: 16 random frames (timing only, no AUROC; bench lifts the routing limits so
    that they reach a flow, see ROUTING_NOTE).
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


# --- sizes and FLOPs ------------------------------------------------------------------------------
def _artifact_mb(root: Path, artifacts: Sequence[ArtifactFile | None]) -> float:
    total = 0
    for artifact in artifacts:
        if artifact is None:
            continue
        for name, _ in artifact.paths():
            total += (root / name).stat().st_size
    return total / 2**20


def export_size_mb(root: Path, manifest: Manifest, precision: str) -> float | None:
    if precision not in manifest.backbone_graphs:
        return None
    listed = [manifest.backbone_graphs[precision], manifest.router_file]
    listed += [t.graphs.get(precision) for t in manifest.tasks]
    return round(_artifact_mb(root, listed), 2)


def graph_macs(path: Path) -> dict[str, int]:
    """Multiply-accumulates per op type (Conv, MatMul, Gemm) of one image (batch 1), from inferred shapes.

    Conv: output elements x (C_in / groups) x kernel area; MatMul/Gemm: output elements x K.
    """
    import onnx
    from onnx import shape_inference

    model = onnx.load(str(path), load_external_data=False)
    for graph_input in model.graph.input:  # pin the batch dimension to 1
        dims = graph_input.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = 1
    model = shape_inference.infer_shapes(model)
    shapes: dict[str, list[int]] = {}
    for value in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else 1 for d in dims]
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    macs = {"Conv": 0, "MatMul": 0, "Gemm": 0}
    for node in model.graph.node:
        if node.op_type not in macs or node.output[0] not in shapes:
            continue
        out = shapes[node.output[0]]
        weight = shapes.get(node.input[1])
        if weight is None:
            continue
        if node.op_type == "Conv":
            macs["Conv"] += int(np.prod(out)) * int(np.prod(weight[1:]))  # weight (C_out, C_in/g, kh, kw)
        elif node.op_type == "MatMul":
            macs["MatMul"] += int(np.prod(out)) * int(weight[-2] if len(weight) >= 2 else weight[0])
        else:
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            macs["Gemm"] += int(np.prod(out)) * int(weight[1] if trans_b else weight[0])
    return macs


def flop_report(root: Path, manifest: Manifest, stage_ms: dict[str, float] | None, peak_gflops: float) -> list[dict]:
    """FLOPs per fp32 graph (2 x MACs, batch 1) and, where measured, achieved GFLOP/s vs the numpy peak."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        return [{"graph": "*", "note": "onnx is not installed (pip install onnx): no FLOP count"}]
    graphs = [("backbone", manifest.backbone_graphs.get("fp32"))]
    graphs += [(f"flow/{t.name}", t.graphs.get("fp32")) for t in manifest.tasks[:1]]
    rows = []
    for name, artifact in graphs:
        if artifact is None:
            continue
        macs = graph_macs(root / artifact.file)
        gflop = 2 * sum(macs.values()) / 1e9
        row: dict = {"graph": name, "macs": macs, "gflop": round(gflop, 4)}
        ms = None if stage_ms is None else stage_ms.get(name.split("/")[0])
        if ms:
            row["measured_ms"] = round(ms, 3)
            row["achieved_gflops"] = round(gflop / (ms / 1e3), 2)
            row["fraction_of_peak"] = round(row["achieved_gflops"] / peak_gflops, 4)
        rows.append(row)
    return rows


# --- one backend ----------------------------------------------------------------------------------
def _percentiles(values: list[float]) -> dict[str, float]:
    return {f"p{q}": round(float(np.percentile(values, q)), 3) for q in PERCENTILES}


def _make_pipeline(
    backend: str,
    precision: str,
    root: Path,
    manifest: Manifest,
    model_dir: Path | None,
    threads: int | None,
    route_all: bool = False,
) -> tuple[Pipeline | None, Callable[[], None], str | None, str | None]:
    """(pipeline, close, skip reason, warning) for one backend and precision. ``route_all`` lifts
    every task's unknown-product limit, so that frames of no known product still reach a flow."""
    from moleflow_edge.runtime import Runtime
    from moleflow_edge.runtime.backend import not_installed

    def nothing() -> None:
        return None

    if precision not in manifest.backbone_graphs and backend != "torch-eager":
        return None, nothing, f"the export has no {precision} graphs (export with --precision {precision})", None
    if backend == "torch-eager":
        if precision != "fp32":
            return None, nothing, "torch eager runs the trained fp32 weights only", None
        if model_dir is None:
            return None, nothing, "needs the model directory (--model DIR)", None
        try:
            import torch  # noqa: F401
        except ImportError:
            return None, nothing, "torch is not installed (pip install moleflow-edge[train])", None
        eager = TorchPipeline(model_dir)
        if route_all:
            eager.table.limits[:] = np.inf
        return eager, nothing, None, None
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
    runtime = Runtime.load(root, row.name, precision, threads=threads)
    if route_all:
        runtime.router.limits[:] = np.inf
    return runtime_pipeline(runtime), runtime.close, None, warning


def measure(pipeline: Pipeline, frames: list[np.ndarray], batch: int, iters: int, warmup: int = 2) -> dict:
    """Per-stage and end-to-end percentiles over ``iters`` calls on consecutive batches of ``frames``."""
    count = max(1, len(frames) // batch)
    batches = [[frames[(i * batch + j) % len(frames)] for j in range(batch)] for i in range(count)]
    for k in range(warmup):
        pipeline(batches[k % len(batches)])
    stages: dict[str, list[float]] = {s: [] for s in STAGES}
    walls = []
    for i in range(iters):
        started = time.perf_counter()
        ms, _ = pipeline(batches[i % len(batches)])
        walls.append((time.perf_counter() - started) * 1e3)
        for s in STAGES:
            stages[s].append(ms[s])
    return {
        "stages_ms": {s: _percentiles(v) for s, v in stages.items()},
        "end_to_end_ms": _percentiles(walls),
        "throughput_fps": round(batch / statistics.median(walls) * 1e3, 2),
    }


def score_all(pipeline: Pipeline, frames: list[np.ndarray], batch: int = 8) -> list[tuple[str, float | None]]:
    outputs: list[tuple[str, float | None]] = []
    for i in range(0, len(frames), batch):
        outputs += pipeline(frames[i : i + batch])[1]
    return outputs


# --- task-count growth ----------------------------------------------------------------------------
def task_growth(export_dir: str | Path, counts: Sequence[int] = TASK_COUNTS, iters: int = 50) -> list[dict]:
    """Routing time, memory and load times for exports of 1, 5, 15, 50 tasks.

    Synthetic: each count is a copy of the export whose tasks all use the first task's fp32
    flow graph, with prototypes perturbed from its own; the router is what grows.
    """
    from safetensors.numpy import load_file, save_file

    from moleflow_edge.runtime import Backend, Runtime

    root = Path(export_dir)
    manifest = load_manifest(root)
    base = manifest.tasks[0]
    prototypes = load_file(str(root / manifest.router_file.file))  # type: ignore[union-attr]
    mean, whitener = prototypes[f"{base.name}.mean"], prototypes[f"{base.name}.whitener"]
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_tasks_") as tmp:
        for count in counts:
            work = Path(tmp) / str(count)
            shutil.copytree(root, work, ignore=shutil.ignore_patterns("engines"))
            m = load_manifest(work, verify=False)
            names = [f"task{i:03d}" for i in range(count)]
            tensors = {}
            for i, name in enumerate(names):
                tensors[f"{name}.mean"] = (mean + 0.1 * i * rng.standard_normal(mean.shape)).astype(np.float32)
                tensors[f"{name}.whitener"] = whitener
            save_file(tensors, str(work / m.router_file.file))  # type: ignore[union-attr]
            m.router_file.sha256 = file_sha256(work / m.router_file.file)  # type: ignore[union-attr]
            m.engines = {}
            m.tasks = [TaskEntry(name=n, graphs={"fp32": base.graphs["fp32"]}, distance_limit=1e30) for n in names]
            save_manifest(work, m)
            before = rss_mb()
            started = time.perf_counter()
            runtime = Runtime.load(work, Backend.ONNXRUNTIME, "fp32", max_resident_tasks=None)
            load_ms = (time.perf_counter() - started) * 1e3
            engine_ms = []
            for name in names:
                engine_ms.append(runtime.engines.get(name)[1] * 1e3)
            features = rng.standard_normal((8, m.routing_dim)).astype(np.float32)
            routing = []
            for _ in range(iters):
                started = time.perf_counter()
                runtime.router.route(runtime.router.distances(features[:1]))
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


# --- the benchmark ----------------------------------------------------------------------------------
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
    task_growth, chart (the PNG path, or why none was written). ``backends`` defaults to every
    backend known, so that the missing GPU ones are listed as skipped with the reason.

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
            pipeline, close, reason, warning = _make_pipeline(
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
                    if row["stages_ms"]["flow"]["p50"] == 0.0:  # the flow never ran: not an end-to-end time
                        warning = "no frame reached a flow (all unknown products): end-to-end leaves the flow out"
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
        summary.append({"backend": s["backend"], "precision": s["precision"], "status": "skipped"})
    reference = next((r for r in results if r["backend"] == "onnxruntime-cpu" and r["precision"] == "fp32"
                      and r["batch"] == 1), None)  # fmt: skip
    stage_p50 = None if reference is None else {s: v["p50"] for s, v in reference["stages_ms"].items()}
    report = {
        "machine": machine,
        "export": str(root),
        "iters": iters,
        "results": results,
        "skipped": skipped,
        "summary": summary,
        "flops": flop_report(root, manifest, stage_p50, machine["numpy_matmul_gflops"]),
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
                peak = f", {100 * row['fraction_of_peak']:.1f}% of peak" if "fraction_of_peak" in row else ""
                printer(f"FLOPs {row['graph']}: {row['gflop']:.3f} GFLOP/image{peak}")
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
    if backend == "torch-eager":
        if model is None:
            return None
        return round(sum(p.stat().st_size for p in model.glob("*.safetensors")) / 2**20, 2)
    return export_size_mb(root, manifest, precision)


def summary_table(summary: list[dict]) -> str:
    """The ultralytics-style table: backend, precision, status, size, image AUROC, ms/image, FPS."""
    head = f"{'backend':22s} {'precision':9s} {'status':8s} {'size MiB':>9s} {'AUROC':>7s} {'ms/image':>9s} {'FPS':>8s}"
    lines = [head]

    def cell(value: object, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for r in summary:
        lines.append(
            f"{r['backend']:22s} {r['precision']:9s} {r['status']:8s} {cell(r.get('size_mb'), '9.2f'):>9s} "
            f"{cell(r.get('image_auroc'), '7.4f'):>7s} {cell(r.get('ms_per_image'), '9.2f'):>9s} "
            f"{cell(r.get('fps'), '8.1f'):>8s}"
        )
    return "\n".join(lines)


def markdown_table(results: list[dict]) -> str:
    """Per-stage p50 latency (ms per call) for every backend, precision and batch."""
    lines = [
        "| backend | precision | batch | " + " | ".join(STAGES) + " | end-to-end p50 | p99 | FPS | AUROC |",
        "|---|---|---:|" + "---:|" * (len(STAGES) + 4),
    ]
    for r in results:
        stages = " | ".join(f"{r['stages_ms'][s]['p50']:.2f}" for s in STAGES)
        score = "-" if r["image_auroc"] is None else f"{r['image_auroc']:.4f}"
        lines.append(
            f"| {r['backend']} | {r['precision']} | {r['batch']} | {stages} | {r['end_to_end_ms']['p50']:.2f} "
            f"| {r['end_to_end_ms']['p99']:.2f} | {r['throughput_fps']:.1f} | {score} |"
        )
    return "\n".join(lines)


def save_chart(results: list[dict], path: str | Path) -> str:
    """Stacked per-stage p50 ms per image (batch 1 rows), a line at the papers' 15 ms; a note without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no chart written"
    rows = [r for r in results if r["batch"] == min(x["batch"] for x in results)]
    labels = [f"{r['backend']}\n{r['precision']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(rows)), 4))
    bottom = np.zeros(len(rows))
    for stage in STAGES:
        values = np.array([r["stages_ms"][stage]["p50"] / r["batch"] for r in rows])
        ax.bar(labels, values, bottom=bottom, label=stage)
        bottom += values
    ax.axhline(PAPER_LATENCY_MS, color="k", linestyle="--", label=f"papers' {PAPER_LATENCY_MS:g} ms")
    ax.set_ylabel("ms per image (p50)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(str(path), dpi=120)
    plt.close(fig)
    return str(path)
