"""Runtime vs PyTorch eager: latency per stage and throughput on this CPU, same frames, same run.

    python benchmarks/runtime_bench.py [--work DIR] [--steps 4] [--iters 40] [--batches 1,8]

Builds (or reuses, under --work) a default-size model: 224 px input, EfficientNet-Lite0,
D = 152 (the backbone's channels), M = 6 MoLE blocks, N = 2 DIA blocks, r = 64, trained for a
few optimiser steps (--steps, at most; 4 = the old 2 epochs of 30 images at batch 16) on three
synthetic products (timing needs no accuracy), exports it, then runs the same frames through
  - the runtime over PyTorch eager (moleflow_edge/torch_backend.py: the trained model's modules)
  - the runtime on onnxruntime's CPU provider (and on OpenVINO when it is installed).
Prints per-stage milliseconds, images/s and the runtime/PyTorch ratios; checks that both give
the same task and the same scores. No asserts: this measures, tests check.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np

from moleflow_edge.bench.measure import load_test_frames, measure_interleaved, score_all
from moleflow_edge.bench.pipelines import runtime_pipeline
from moleflow_edge.runtime.result import STAGES

TASKS = ["weave", "tiles", "screw"]


def prepare(work: Path, steps: int) -> tuple[Path, Path, Path]:
    """Synthetic data, a default-size model trained for at most ``steps`` optimiser steps per task
    and its fp32 export under ``work`` (reused when present, whatever ``steps`` it was trained with)."""
    from moleflow_edge.config import MoleFlowConfig
    from moleflow_edge.data.synth import generate
    from moleflow_edge.export.exporter import export_model
    from moleflow_edge.model_store import ModelStore
    from moleflow_edge.train import train_task

    data, model_dir, export_dir = work / "data", work / "model", work / "export"
    if not data.is_dir():
        generate(data, [*TASKS, "cap"], seed=0, image_size=224, n_train=30, n_test_good=8, n_test_defect=3)
    config = MoleFlowConfig(image_size=224, embed_dim=152).with_settings(
        "flow", num_mole_blocks=6, num_dia_blocks=2, lora_rank=64, lora_alpha=64.0, max_steps=steps, batch_size=16
    )
    done = ModelStore(model_dir).tasks()
    for task in TASKS:
        if task not in done:
            print(f"training {task} (at most {steps} optimiser steps) ...", file=sys.stderr)
            train_task(data, task, model_dir, config, progress=False)
    if not (export_dir / "manifest.json").is_file():
        print("exporting ...", file=sys.stderr)
        export_model(model_dir, export_dir)
    return data, model_dir, export_dir


def load_frames(data: Path, count: int, frame_hw: tuple[int, int] | None) -> list[np.ndarray]:
    """The first ``count`` test images of the trained products, interleaved so that consecutive frames
    change task (load_test_frames); rescaled to a camera's (height, width) when given, so that
    resizing is part of the work."""
    import cv2

    frames = load_test_frames(data, TASKS, 224)[0][:count]
    if frame_hw is not None:
        frames = [cv2.resize(f, (frame_hw[1], frame_hw[0]), interpolation=cv2.INTER_LINEAR) for f in frames]
    return frames


def summary(batch: int, measured: dict) -> dict:
    """One engine's row of the printed table and the JSON: medians per call and per stage, p90, images/s."""
    wall = measured["end_to_end_ms"]
    return {
        "batch": batch,
        "wall_ms": wall["p50"],
        "p90_ms": wall["p90"],
        "images_per_s": measured["throughput_fps"],
        "stages_ms": {s: v["p50"] for s, v in measured["stages_ms"].items()},
    }


def compare(reference: list, other: list) -> tuple[bool, float]:
    """Same task everywhere, and the worst relative image-score difference."""
    same = all(a[0] == b[0] for a, b in zip(reference, other, strict=True))
    worst = 0.0
    for (_, a), (_, b) in zip(reference, other, strict=True):
        if a is not None and b is not None:
            worst = max(worst, abs(a - b) / max(abs(a), 1e-12))
    return same, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("runs/runtime_bench"), help="data, model and export (reused)")
    parser.add_argument("--steps", type=int, default=4, help="optimiser steps per task at most (timing only)")
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads for every engine (default: cores)")
    parser.add_argument("--frame-hw", default=None, help="camera frame size HEIGHT,WIDTH (default: the 224 px images)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args()

    import onnxruntime
    import torch

    from moleflow_edge.runtime import Backend, Runtime, RuntimeOptions, available_backends
    from moleflow_edge.torch_backend import model_runtime

    data, model_dir, export_dir = prepare(args.work, args.steps)
    batches = [int(b) for b in args.batches.split(",")]
    frame_hw = tuple(int(v) for v in args.frame_hw.split(",")) if args.frame_hw else None
    frames = load_frames(data, 48, frame_hw)  # type: ignore[arg-type]
    if args.threads:
        torch.set_num_threads(args.threads)

    engines = {"pytorch eager": runtime_pipeline(model_runtime(model_dir))}
    cpu = RuntimeOptions(Backend.ONNXRUNTIME, threads=args.threads)
    runtimes = {"runtime onnxruntime-cpu": Runtime.load(export_dir, cpu)}
    if Backend.OPENVINO in available_backends():
        openvino = RuntimeOptions(Backend.OPENVINO, threads=args.threads)
        runtimes["runtime openvino-cpu"] = Runtime.load(export_dir, openvino)
    for name, runtime in runtimes.items():
        engines[name] = runtime_pipeline(runtime)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs (load {load:.1f} at start), {torch.get_num_threads()} torch "
          f"threads, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}", flush=True)  # fmt: skip
    shape = frames[0].shape[:2]
    print(f"# {len(frames)} frames of {shape[0]}x{shape[1]} px, model input 224 px", flush=True)
    report: dict = {"frames": len(frames), "frame_hw": list(shape), "image_size": 224, "threads": args.threads}
    report["results"] = {}
    for batch in batches:
        print(f"\n## batch {batch}: median ms per call (per stage), images/s")
        header = (
            f"{'engine':26s} " + " ".join(f"{s:>11s}" for s in STAGES) + f" {'total':>9s} {'p90':>8s} {'img/s':>8s}"
        )
        print(header)
        timed = measure_interleaved(engines, frames, batch, args.iters)
        measured = {name: summary(batch, m) for name, m in timed.items()}
        outputs = {name: score_all(engine, frames, batch) for name, engine in engines.items()}
        reference = measured["pytorch eager"]
        for name, m in measured.items():
            row = " ".join(f"{m['stages_ms'][s]:11.2f}" for s in STAGES)
            print(f"{name:26s} {row} {m['wall_ms']:9.2f} {m['p90_ms']:8.2f} {m['images_per_s']:8.1f}")
        for name, m in measured.items():
            if name == "pytorch eager":
                continue
            same, worst = compare(outputs["pytorch eager"], outputs[name])
            ratio = m["images_per_s"] / reference["images_per_s"]
            print(
                f"{name}: {ratio:.2f}x PyTorch eager throughput; same tasks: {same}; worst score diff {worst:.1e} rel"
            )
        report["results"][batch] = measured
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
