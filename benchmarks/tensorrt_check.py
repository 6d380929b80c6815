"""TensorRT check: build fp32/fp16/INT8 engines for a tiny trained model and run them through the runtime.

Where ``tensorrt`` (with cuda-python and a GPU) is installed: trains two synthetic products
with a small config, exports them with ``--format engine`` in every precision, runs each
precision through the runtime's native TensorRT backend at batch 1 and at the batch profile's
maximum, compares image scores and routing with onnxruntime on the CPU (same precision, and
fp32), and reports per-stage milliseconds, milliseconds per call and images/s (medians over
--iters calls on consecutive batches of the test frames, timed by moleflow_edge.bench.measure
as runtime_bench is). Elsewhere it says why, measures nothing and exits 0.
benchmarks/gpu_check.py runs this script (with --json) for its TensorRT part.

    python benchmarks/tensorrt_check.py [--work DIR] [--json OUT] [--iters N]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from moleflow_edge.bench.measure import measure
from moleflow_edge.bench.pipelines import runtime_pipeline
from moleflow_edge.config import MoleFlowConfig
from moleflow_edge.data.mvtec import load_split
from moleflow_edge.data.synth import generate
from moleflow_edge.export.exporter import export_model
from moleflow_edge.runtime import Runtime, RuntimeOptions
from moleflow_edge.runtime.backend import Backend, available_backends
from moleflow_edge.train import train_task

TASKS = ["weave", "tiles"]
PRECISIONS = ("fp32", "fp16", "int8")
BATCH_PROFILE = (1, 4, 8)
CONFIG = MoleFlowConfig(image_size=128, embed_dim=64).with_settings(
    "flow", num_mole_blocks=2, num_dia_blocks=1, lora_rank=8, lora_alpha=8.0, batch_size=8
)


def unavailable() -> str | None:
    """Why nothing can be measured here, or None."""
    if Backend.TENSORRT not in available_backends():
        return "tensorrt with cuda-python is not installed: nothing measured"
    from moleflow_edge.runtime import cuda_memory

    if cuda_memory.device_count() == 0:
        return "no CUDA device is visible: nothing measured"
    return None


def _scores(runtime: Runtime, frames: np.ndarray) -> tuple[np.ndarray, list[str | None]]:
    results = runtime.infer(frames, with_maps=False)
    return np.array([np.nan if r.image_score is None else r.image_score for r in results]), [r.task for r in results]


def tensorrt_section(work: Path, iters: int = 20) -> dict[str, object]:
    """The TensorRT section of the GPU check: one row per precision and batch."""
    reason = unavailable()
    if reason is not None:
        return {"status": "skipped", "reason": reason}
    data, model_dir, out = work / "data", work / "model", work / "export"
    generate(data, TASKS, seed=0, image_size=CONFIG.image_size, n_train=30, n_test_good=8, n_test_defect=4)
    for task in TASKS:
        train_task(data, task, model_dir, CONFIG, progress=False)
    export_model(model_dir, out, precisions=PRECISIONS, fmt="engine", calib_data=data, batch_profile=BATCH_PROFILE)
    frames = np.concatenate([load_split(data, task, "test", CONFIG.image_size).images for task in TASKS])
    frames = frames[: BATCH_PROFILE[2]]
    cpu = {p: _scores(Runtime.load(out, RuntimeOptions("onnxruntime-cpu", p)), frames)
           for p in PRECISIONS}  # fmt: skip
    rows = []
    for precision in PRECISIONS:
        runtime = Runtime.load(out, RuntimeOptions("tensorrt", precision))
        scores, tasks = _scores(runtime, frames)
        for reference in sorted({precision, "fp32"}):
            ref_scores, ref_tasks = cpu[reference]
            rows.append({"precision": precision, "versus_cpu": reference,
                         "max_rel_score_diff": float(np.nanmax(np.abs(scores - ref_scores) / np.abs(ref_scores))),
                         "same_route": float(np.mean([a == b for a, b in zip(tasks, ref_tasks, strict=True)]))})  # fmt: skip
        for batch in (1, BATCH_PROFILE[2]):
            timed = measure(runtime_pipeline(runtime), list(frames), batch, iters)
            rows.append({"precision": precision, "batch": batch,
                         "stage_ms": {s: v["p50"] for s, v in timed["stages_ms"].items()},
                         "call_ms": timed["end_to_end_ms"]["p50"], "images_per_s": timed["throughput_fps"]})  # fmt: skip
        device = runtime.description
        runtime.close()
    return {"status": "measured", "device": device, "batch_profile": list(BATCH_PROFILE), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="write the result here too")
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = tensorrt_section(args.work or Path(tmp), args.iters)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
