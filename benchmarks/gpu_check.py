"""GPU check: every CUDA path of the toolkit, measured on the NVIDIA GPU at hand.

(a) trains two synthetic products on the CPU, on CUDA in float32 and on CUDA with mixed precision,
    and checks the CUDA models against the CPU one within TOLERANCE (scored on the CPU, so only
    training differs); checks the CUDA-trained files are CPU tensors and export to the same bytes
    whichever --device the export names.
(b) times each stage (backbone+embedding, routing, flow, anomaly map) with CUDA events for PyTorch
    eager float32, eager float16 (autocast) and captured CUDA graphs of both, at batch 1 and 8, for
    EfficientNet-Lite0 and WideResNet-50-2 at the papers' sizes, against their ~15 ms per image.
    The backbones have random weights: timing does not depend on the weight values.
(c) runs the runtime's device-memory code (runtime/cuda_memory.py, the TensorRT backend's
    device-side row gather) on real device buffers, routes on the device with the router graph
    fed through those buffers, and checks both against the CPU path; then the TensorRT section
    (benchmarks/tensorrt_check.py) and onnxruntime's GPU providers where installed.
(d) writes gpu_check.json and gpu_check.md (--out) and puts the markdown into --readme.

Without a GPU it says so, measures nothing and exits 0.

    python benchmarks/gpu_check.py [--out DIR] [--readme benchmarks/README.md] [--iters N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import torch

PAPER_MS_PER_IMAGE = 15.0  # the MoLE-Flow papers' inference time per image on a GPU
TASKS = ["weave", "tiles"]
TRAIN_CONFIG_FIELDS = dict(image_size=128, embed_dim=64)
TRAIN_FLOW_FIELDS = {
    "num_mole_blocks": 2,
    "num_dia_blocks": 1,
    "lora_rank": 8,
    "lora_alpha": 8.0,
    "batch_size": 8,
    "max_steps": 80,
}
# CUDA and CPU sum floats in different orders; over 80 steps that moves the weights a little,
# so CUDA training matches CPU training in what it decides, not bit for bit:
TOLERANCE = {
    "cuda_fp32": {"auroc_abs": 0.02, "route_agreement": 1.0, "median_rel_score": 0.05},
    "cuda_amp": {"auroc_abs": 0.05, "route_agreement": 0.95, "median_rel_score": 0.15},
}
ROUTER_TASKS = 15  # prototypes in the timed router: the MVTec AD product count
BATCHES = (1, 8)
MODES = ("eager_fp32", "eager_fp16", "cudagraph_fp32", "cudagraph_fp16")
README_BEGIN, README_END = "<!-- gpu_check:begin -->", "<!-- gpu_check:end -->"


def no_gpu_reason() -> str | None:
    """Why nothing can be measured here, or None when torch sees a CUDA device."""
    if torch.version.cuda is None:
        return "no GPU: this torch is a CPU-only build; nothing measured"
    if not torch.cuda.is_available():
        return "no GPU: torch sees no CUDA device; nothing measured"
    return None


# --- (a) training on CUDA against training on the CPU ---------------------------------------------
def training_section(work: Path) -> dict[str, object]:
    from safetensors import safe_open

    from moleflow_edge.config import MoleFlowConfig
    from moleflow_edge.data.mvtec import load_split
    from moleflow_edge.data.synth import generate
    from moleflow_edge.evaluate import evaluate
    from moleflow_edge.export.exporter import export_model
    from moleflow_edge.torch_backend import model_runtime
    from moleflow_edge.train import train_task

    config = MoleFlowConfig(**TRAIN_CONFIG_FIELDS).with_settings("flow", **TRAIN_FLOW_FIELDS)
    data = work / "data"
    generate(data, TASKS, seed=0, image_size=config.image_size, n_train=30, n_test_good=8, n_test_defect=4)
    runs = {"cpu": ("cpu", False), "cuda_fp32": ("cuda", False), "cuda_amp": ("cuda", True)}
    result: dict[str, dict] = {}
    for name, (device, amp) in runs.items():
        model_dir = work / name
        seconds = 0.0
        for task in TASKS:
            report = train_task(data, task, model_dir, config, progress=False, device=device, amp=amp)
            seconds += report.feature_seconds + report.train_seconds
        metrics = evaluate(data, model_dir, device="cpu")["tasks"]
        runtime, routes, scores = model_runtime(model_dir), [], []
        for task in TASKS:
            images = load_split(data, task, "test", config.image_size).images
            routed = runtime.infer(images, with_maps=False)
            routes += [r.task for r in routed]
            scores.append(np.array([np.inf if r.image_score is None else r.image_score for r in routed]))
        tensors = {}
        for path in sorted(model_dir.rglob("*.safetensors")):
            with safe_open(str(path), "pt") as f:
                tensors.update({f"{path.name}:{k}": (str(f.get_tensor(k).device), str(f.get_tensor(k).dtype))
                                for k in f.keys()})  # fmt: skip
        result[name] = {"seconds": round(seconds, 2), "auroc": {t: metrics[t]["image_auroc"] for t in TASKS},
                        "routes": routes, "scores": np.concatenate(scores), "tensors": tensors}  # fmt: skip
    cpu = result["cpu"]
    rows = {}
    for name in ("cuda_fp32", "cuda_amp"):
        run, limit = result[name], TOLERANCE[name]
        auroc = max(abs(run["auroc"][t] - cpu["auroc"][t]) for t in TASKS)
        agree = float(np.mean([a == b for a, b in zip(run["routes"], cpu["routes"], strict=True)]))
        rel = float(np.median(np.abs(run["scores"] - cpu["scores"]) / np.abs(cpu["scores"])))
        rows[name] = {"train_seconds": run["seconds"], "auroc": run["auroc"], "max_auroc_diff": round(auroc, 4),
                      "route_agreement": agree, "median_rel_score_diff": round(rel, 4),
                      "saved_like_cpu": run["tensors"] == cpu["tensors"], "tolerance": limit,
                      "within": auroc <= limit["auroc_abs"] and agree >= limit["route_agreement"]
                      and rel <= limit["median_rel_score"]}  # fmt: skip
    exports = {}
    for label, device_id in (("cpu", 0), ("cuda:0", 0)):  # ONNX graphs: traced on the CPU for every --device
        out = work / f"export_{label.replace(':', '')}"
        export_model(work / "cuda_fp32", out, device_id=device_id)
        exports[label] = {p.name: p.read_bytes() for p in sorted(out.rglob("*.onnx"))}
    return {"config": TRAIN_CONFIG_FIELDS, "cpu": {"train_seconds": cpu["seconds"], "auroc": cpu["auroc"]},
            **rows, "export_bit_identical": exports["cpu"] == exports["cuda:0"] and bool(exports["cpu"])}  # fmt: skip


def full_size_training(work: Path) -> dict[str, object]:
    """Seconds per optimiser step at the papers' sizes (WideResNet-50-2, random weights), CUDA float32 vs AMP."""
    from moleflow_edge.config import MoleFlowConfig
    from moleflow_edge.data.synth import generate
    from moleflow_edge.train import train_task

    config = MoleFlowConfig(backbone="wide_resnet50_2", holdout_fraction=0.0).with_settings("flow", max_steps=40)
    data = work / "full_data"
    generate(data, ["weave"], seed=0, image_size=config.image_size, n_train=32, n_test_good=1, n_test_defect=1)
    rows = {}
    for amp in (False, True):
        report = train_task(data, "weave", work / f"full_{amp}", config, progress=False, random_backbone=True,
                            device="cuda", amp=amp)  # fmt: skip
        rows["cuda_amp" if amp else "cuda_fp32"] = {"feature_seconds": round(report.feature_seconds, 2),
                                                    "ms_per_step": round(1000 * report.train_seconds / report.metrics["steps"], 1)}  # fmt: skip
    return {"backbone": config.backbone, "images": 32, "variants_per_image": config.augment_copies + 1,
            "batch_size": config.section("flow").batch_size, "steps": config.section("flow").max_steps, **rows}  # fmt: skip


# --- (b) per-stage latency with CUDA events -------------------------------------------------------
def timed_pipeline(backbone: str, device: torch.device) -> tuple[object, Callable, object]:
    """A default-size model with one task and a router over ROUTER_TASKS prototypes, random weights."""
    from moleflow_edge.config import DetectorKind, MoleFlowConfig
    from moleflow_edge.detectors.registry import kind_of
    from moleflow_edge.export.onnx_graphs import RouterGraph
    from moleflow_edge.model_store import ModelStore
    from moleflow_edge.router import Prototype, RouterTable
    from moleflow_edge.train import prepare_model

    config = MoleFlowConfig(backbone=backbone)
    torch.manual_seed(0)
    model = prepare_model(ModelStore(Path(tempfile.mkdtemp())), config, random_backbone=True)
    model.add_task("product", kind_of(DetectorKind.FLOW))
    model.eval().to(device)
    channels = model.backbone.channels16
    rng = np.random.default_rng(0)
    prototypes = [Prototype(rng.standard_normal(channels).astype(np.float32),
                            np.eye(channels, dtype=np.float32), 1.0) for _ in range(ROUTER_TASKS)]  # fmt: skip
    router = RouterGraph(RouterTable([f"p{i}" for i in range(ROUTER_TASKS)], prototypes)).to(device)
    return model, router, model.config


def stage_functions(model, router) -> dict[str, Callable[[torch.Tensor], object]]:  # noqa: ANN001
    from moleflow_edge.detectors.flow.parts import patch_scores, top_k_mean

    def backbone_embed(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = model.backbone_maps(images)
        return model.embed(model.patch_concat(maps)), model.routing_feature(maps)

    def routing(pair: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return router(pair[1]).argmin(dim=1)

    def flow(pair: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        patch = patch_scores(model, pair[0], "product")
        return patch, top_k_mean(patch, model.config.top_k)

    return {"backbone_embed": backbone_embed, "routing": routing, "flow": flow}


def _autocast(fp16: bool) -> torch.autocast:
    # no weight-cast cache: a captured graph must not keep tensors cast outside it
    return torch.autocast("cuda", dtype=torch.float16, enabled=fp16, cache_enabled=False)


def time_stages(model, router, config, batch: int, mode: str, iters: int) -> dict[str, float]:  # noqa: ANN001
    """Median milliseconds per stage for one batch; GPU stages by CUDA events, the anomaly map
    (host OpenCV in the runtime, after the scores come back) by the host clock."""
    from moleflow_edge.anomaly_map import anomaly_map

    fp16, graphed = mode.endswith("fp16"), mode.startswith("cudagraph")
    stages = stage_functions(model, router)
    images = torch.randint(0, 256, (batch, config.image_size, config.image_size, 3), dtype=torch.uint8, device="cuda")
    with torch.no_grad(), _autocast(fp16):
        features = stages["backbone_embed"](images)
        inputs = {"backbone_embed": images, "routing": features, "flow": features}
        runners: dict[str, Callable[[], object]] = {}
        outputs: dict[str, object] = {}
        for name, fn in stages.items():
            if not graphed:
                runners[name] = lambda fn=fn, x=inputs[name]: fn(x)
                continue
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):  # warm-up outside capture, as torch.cuda.graph requires
                    fn(inputs[name])
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outputs[name] = fn(inputs[name])
            runners[name] = graph.replay
        for run in runners.values():  # warm-up: cuDNN autotuning, allocations
            run()
        torch.cuda.synchronize()
        samples: dict[str, list[float]] = {name: [] for name in [*runners, "anomaly_map"]}
        for _ in range(iters):
            for name, run in runners.items():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                result = run()  # a graph's replay writes its captured outputs in place
                if not graphed:
                    outputs[name] = result
                end.record()
                end.synchronize()
                samples[name].append(start.elapsed_time(end))
            started = time.perf_counter()
            patch = outputs["flow"][0].float().cpu().numpy()  # type: ignore[index]
            for p in patch:
                anomaly_map(p, config.image_size, config.map_sigma)
            samples["anomaly_map"].append(1000 * (time.perf_counter() - started))
    return {name: round(float(np.median(v)), 3) for name, v in samples.items()}


def latency_section(iters: int) -> list[dict[str, object]]:
    rows = []
    for backbone in ("efficientnet_lite0", "wide_resnet50_2"):
        model, router, config = timed_pipeline(backbone, torch.device("cuda"))
        for batch in BATCHES:
            for mode in MODES:
                stage_ms = time_stages(model, router, config, batch, mode, iters)
                per_image = sum(stage_ms.values()) / batch
                rows.append({"backbone": backbone, "batch": batch, "mode": mode, "stage_ms": stage_ms,
                             "ms_per_image": round(per_image, 3), "meets_paper": per_image <= PAPER_MS_PER_IMAGE})  # fmt: skip
        del model, router
        torch.cuda.empty_cache()
    return rows


# --- (c) the runtime's device code on real device buffers -----------------------------------------
def runtime_section(work: Path) -> dict[str, object]:
    """cuda_memory's stream, pinned and device buffers, the TensorRT backend's device-side row gather
    and routing on the device, each against the same data on the CPU."""
    import onnxruntime as ort

    from moleflow_edge.export.onnx_graphs import RouterGraph
    from moleflow_edge.router import Prototype, RouterTable
    from moleflow_edge.runtime import cuda_memory as cm
    from moleflow_edge.runtime.backend import FeatureBatch
    from moleflow_edge.runtime.tensorrt_backend import TensorRtBackend

    if not cm.cuda_available():
        return {"status": "skipped", "reason": "cuda-python is not installed"}
    checks: dict[str, object] = {"devices": cm.device_count(), "compute_capability": cm.compute_capability(0)}
    cm.set_device(0)
    stream = cm.CudaStream()
    rng = np.random.default_rng(0)
    embedding = rng.standard_normal((8, 64, 14, 14)).astype(np.float32)  # (B,D,H,W) as a backbone writes it
    row = embedding[0].nbytes
    host = cm.PinnedBuffer(embedding.shape, np.float32)
    host.array[:] = embedding
    device = cm.DeviceBuffer(embedding.nbytes)
    device.copy_from_host(host.ptr, embedding.nbytes, stream)  # type: ignore[arg-type]
    backend = SimpleNamespace(_row_bytes=row, _gather=cm.DeviceBuffer(8 * row), stream=stream)
    gathered = {}
    for rows in ([2, 3, 4], [0, 5, 7], [6], list(range(8))):  # in place, gathered, one row, all
        address = TensorRtBackend.embedding_rows(backend, FeatureBatch(8, device), rows)  # type: ignore[arg-type]
        back = cm.PinnedBuffer((len(rows), *embedding.shape[1:]), np.float32)
        cm.DeviceBuffer.copy_to_host(SimpleNamespace(ptr=address), back.ptr, len(rows) * row, stream)  # type: ignore[arg-type]
        stream.synchronize()
        gathered[str(rows)] = bool(np.array_equal(back.array, embedding[rows]))
        back.close()
    checks["row_gather_equals_numpy"] = gathered

    channels, tasks = 112, 15
    prototypes = []
    for _ in range(tasks):
        whitener = np.linalg.cholesky(np.eye(channels) + 0.1 * np.cov(rng.standard_normal((channels, 4 * channels))))
        prototypes.append(
            Prototype(rng.standard_normal(channels).astype(np.float32), whitener.T.astype(np.float32), 1.0)
        )
    table = RouterTable([f"p{i}" for i in range(tasks)], prototypes)
    features = rng.standard_normal((8, channels)).astype(np.float32) + prototypes[3].mean
    staged = cm.PinnedBuffer(features.shape, np.float32)
    staged.array[:] = features
    raw = cm.DeviceBuffer(features.nbytes)
    raw.copy_from_host(staged.ptr, features.nbytes, stream)  # type: ignore[arg-type]
    on_device = torch.empty(features.shape, dtype=torch.float32, device="cuda")
    cm.DeviceBuffer.copy_from_device(SimpleNamespace(ptr=on_device.data_ptr()), raw.ptr, features.nbytes, stream)  # type: ignore[arg-type]
    stream.synchronize()
    with torch.no_grad():
        gpu = RouterGraph(table).cuda()(on_device).cpu().numpy()
    cpu = table.distances(features)
    checks["routing_on_device"] = {
        "max_rel_distance_diff": float(np.max(np.abs(gpu - cpu) / np.abs(cpu))),
        "same_routes": table.assign(gpu) == table.assign(cpu),
    }
    try:
        cm.set_device(cm.device_count() + 7)
        checks["invalid_device_raises"] = False
    except cm.CudaError as exc:
        checks["invalid_device_raises"] = str(exc)
    cm.set_device(0)
    for buffer in (device, raw, backend._gather, host, staged):
        buffer.close()
        buffer.close()  # a second close is a no-op, never a double free
    stream.close()
    providers = ort.get_available_providers()
    checks["onnxruntime_gpu"] = (
        "CUDA/TensorRT providers present: run benchmarks/runtime_bench.py for them"
        if {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(providers)
        else f"skipped: onnxruntime {ort.__version__} has only {providers} (install onnxruntime-gpu)"
    )
    checks["tensorrt"] = tensorrt_check(work)
    return {"status": "measured", **checks}


def tensorrt_check(work: Path) -> dict[str, object]:
    """benchmarks/tensorrt_check.py's result, run as a program of its own: the benchmark scripts
    import the installed package only, never each other (and TensorRT gets a fresh process)."""
    out = work / "tensorrt.json"
    script = Path(__file__).with_name("tensorrt_check.py")
    done = subprocess.run([sys.executable, str(script), "--work", str(work / "tensorrt"), "--json", str(out)],
                          capture_output=True, text=True, check=False)  # fmt: skip
    if done.returncode != 0:
        return {"status": "failed", "error": "\n".join(done.stderr.strip().splitlines()[-3:])}
    return json.loads(out.read_text())


# --- (d) results ----------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    """The result as the markdown that goes into benchmarks/README.md."""
    lines = [f"GPU check on **{result['gpu']}** (torch {result['torch']}, CUDA {result['cuda']}); "
             f"`python benchmarks/gpu_check.py`, {result['iters']} timed runs per setting (median).", ""]  # fmt: skip
    failed = [f"{name} failed: {section['error']}" for name, section in result.items()
              if isinstance(section, dict) and section.get("status") == "failed"]  # fmt: skip
    lines += [f"    {line}" for f in failed for line in f.splitlines()] + ([""] if failed else [])
    train = result["training"]
    if "cpu" in train:  # type: ignore[operator]
        lines += training_markdown(train)  # type: ignore[arg-type]
    full = result["full_size_training"]
    if "backbone" in full:  # type: ignore[operator]
        lines += [f"Full-size training on CUDA ({full['backbone']}, random weights, {full['images']} images x "
                  f"{full['variants_per_image']} variants, batch {full['batch_size']}): "
                  + ", ".join(f"{k} {v['ms_per_step']} ms/step, features {v['feature_seconds']} s"
                              for k, v in full.items() if k.startswith("cuda")), ""]  # type: ignore[index,union-attr]  # fmt: skip
    lines += latency_markdown(result["latency"]) if isinstance(result["latency"], list) else []
    rt = result["runtime"]
    lines += ["", f"Runtime device code: {json.dumps({k: v for k, v in rt.items() if k != 'tensorrt'})}",  # type: ignore[union-attr]
              "", f"TensorRT section: {json.dumps(rt.get('tensorrt'))}"]  # type: ignore[union-attr]  # fmt: skip
    return "\n".join(lines) + "\n"


def training_markdown(train: dict) -> list[str]:
    lines = ["Training two synthetic products (CPU vs CUDA, scored on the CPU):", "",
              "| run | seconds | max image AUROC diff | route agreement | median score diff | saved like CPU | within tolerance |",
              "|---|---:|---:|---:|---:|---|---|",
              f"| cpu | {train['cpu']['train_seconds']} | | | | | |"]  # fmt: skip
    for name in ("cuda_fp32", "cuda_amp"):
        r = train[name]
        lines.append(f"| {name} | {r['train_seconds']} | {r['max_auroc_diff']} | {r['route_agreement']:.3f} | "
                     f"{r['median_rel_score_diff']:.2%} | {r['saved_like_cpu']} | {r['within']} ({r['tolerance']}) |")  # fmt: skip
    return lines + ["", f"Export of the CUDA-trained model bit-identical from --device cpu and cuda:0: "
                    f"{train['export_bit_identical']}.", ""]  # fmt: skip


def latency_markdown(rows: list[dict]) -> list[str]:
    lines = [f"Per-stage latency, ms per batch (random weights; papers: ~{PAPER_MS_PER_IMAGE:g} ms/image):", "",
              "| backbone | batch | mode | backbone+embed | routing | flow | anomaly map (host) | ms/image |",
              "|---|---:|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        s = r["stage_ms"]
        lines.append(f"| {r['backbone']} | {r['batch']} | {r['mode']} | {s['backbone_embed']} | {s['routing']} | "
                     f"{s['flow']} | {s['anomaly_map']} | {r['ms_per_image']} |")  # fmt: skip
    return lines


def into_readme(readme: Path, text: str) -> None:
    """Replace the section between the gpu_check markers (appended the first time)."""
    current = readme.read_text() if readme.is_file() else ""
    section = f"{README_BEGIN}\n{text}{README_END}"
    if README_BEGIN in current and README_END in current:
        head, rest = current.split(README_BEGIN, 1)
        current = head + section + rest.split(README_END, 1)[1]
    else:
        current = current.rstrip("\n") + "\n\n## GPU check\n\n" + section + "\n"
    readme.write_text(current)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--readme", type=Path, help="markdown file whose GPU check section gets the result")
    parser.add_argument("--iters", type=int, default=30, help="timed runs per setting")
    args = parser.parse_args()
    reason = no_gpu_reason()
    if reason is not None:
        print(reason)
        return 0
    result: dict[str, object] = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                                 "cuda": torch.version.cuda, "iters": args.iters}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, run in (("runtime", lambda: runtime_section(work)), ("training", lambda: training_section(work)),
                          ("latency", lambda: latency_section(args.iters)),
                          ("full_size_training", lambda: full_size_training(work))):  # fmt: skip
            started = time.perf_counter()
            try:
                result[name] = run()
            except Exception as exc:  # one failing section must not hide the others' measurements
                result[name] = {"status": "failed", "error": "".join(traceback.format_exception(exc)[-3:])}
            print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
            if args.out:  # after every section: a run cut short keeps what it measured
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    print(text)
    if args.out:
        (args.out / "gpu_check.md").write_text(text)
    if args.readme:
        into_readme(args.readme, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
