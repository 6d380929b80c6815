"""Soak: 20,000 frames through `moleflow-edge run`, sampling its resident memory (RSS) as it goes.

    python benchmarks/soak_bench.py [--export DIR] [--frames 20000] [--warmup 2000] [--work DIR] [--json OUT]

A line runs for months, so anything the camera loop keeps per frame shows up as memory that only
grows. This runs the real command in a child process (onnxruntime CPU, one thread) on a video of
``--frames`` frames, reads /proc/<pid>/status every ``--every`` frames, and reports the RSS growth
after warm-up (target: under 5 MB). Without --export it trains and exports a tiny synthetic model
(two products, 128 px, a few steps) under --work: memory behaviour does not need accuracy.

Reference, measured in the same run: what the loop's old per-frame latency lists (7 float lists,
one entry per frame each) cost at the same frame count, built in this process.
Linux only (/proc). No asserts: this measures; the exit code is 1 when growth is over the target.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2

TARGET_MB = 5.0
TASKS = ["weave", "tiles"]
LATENCY_SERIES = 7  # the loop's per-stage lists before the reservoir: 6 stages + total


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def tiny_export(work: Path) -> tuple[Path, Path]:
    """A two-product synthetic model at the test suite's tiny size, exported fp32 (reused under ``work``)."""
    from moleflow_edge.config import MoleFlowConfig
    from moleflow_edge.data.synth import generate
    from moleflow_edge.export.exporter import export_model
    from moleflow_edge.model_store import ModelStore
    from moleflow_edge.train import train_task

    data, model_dir, export_dir = work / "data", work / "model", work / "export"
    if not data.is_dir():
        generate(data, TASKS, seed=0, image_size=128, n_train=12, n_test_good=6, n_test_defect=2)
    config = MoleFlowConfig(image_size=128, embed_dim=64, augment_copies=0).with_settings(
        "flow", num_mole_blocks=2, num_dia_blocks=1, lora_rank=8, lora_alpha=8.0, max_steps=6, batch_size=8
    )
    for task in TASKS:
        if task not in ModelStore(model_dir).tasks():
            train_task(data, task, model_dir, config, progress=False)
    if not (export_dir / "manifest.json").is_file():
        export_model(model_dir, export_dir)
    return data, export_dir


def soak_video(images: list[Path], frames: int, path: Path) -> Path:
    """A video of ``frames`` frames cycling through ``images`` (good and defective test images)."""
    pictures = [cv2.imread(str(p)) for p in images]
    height, width = pictures[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30.0, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {path}")
    for i in range(frames):
        writer.write(pictures[i % len(pictures)])
    writer.release()
    return path


def old_lists_mb(frames: int) -> float:
    """RSS that 7 Python float lists of ``frames`` entries each take here (what run kept before)."""
    before = rss_mb(os.getpid())
    lists = [[float(i) + 0.5 * k for i in range(frames)] for k in range(LATENCY_SERIES)]
    grown = rss_mb(os.getpid()) - before
    del lists
    return grown


def soak(export_dir: Path, video: Path, frames: int, warmup: int, every: int) -> dict:
    """Run `moleflow-edge run` on ``video``; RSS samples (frame, MB) every ``every`` frames."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "moleflow_edge.cli", "run", "--export", str(export_dir), "--source", str(video),
               "--backend", "onnxruntime-cpu"]  # fmt: skip
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    samples: list[tuple[int, float]] = []
    seen, errors, summary = 0, 0, None
    assert child.stdout is not None
    for line in child.stdout:
        record = json.loads(line)
        if "summary" in record:
            summary = record["summary"]
            continue
        seen += 1
        errors += "error" in record
        if seen % every == 0:
            samples.append((seen, rss_mb(child.pid)))
    code = child.wait()
    wall = time.perf_counter() - started
    if not samples or samples[-1][0] < warmup:
        raise SystemExit(f"run exited {code} after {seen} frames, before the warm-up of {warmup} ended")
    at_warmup = next(mb for frame, mb in samples if frame >= warmup)
    after = [mb for frame, mb in samples if frame >= warmup]
    return {
        "frames": seen,
        "errors": errors,
        "exit_code": code,
        "wall_s": round(wall, 1),
        "frames_per_s": round(seen / wall, 1),
        "rss_mb_at_warmup": round(at_warmup, 2),
        "rss_mb_final": round(samples[-1][1], 2),
        "growth_mb_after_warmup": round(samples[-1][1] - at_warmup, 2),
        "max_growth_mb_after_warmup": round(max(after) - at_warmup, 2),
        "latency_ms": None if summary is None else summary["latency_ms"]["total"],
        "samples": [(frame, round(mb, 2)) for frame, mb in samples],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", type=Path, help="export to soak (default: a tiny synthetic one under --work)")
    parser.add_argument("--images", type=Path, help="folder of frames to cycle (default: the synthetic test images)")
    parser.add_argument("--frames", type=int, default=20_000)
    parser.add_argument("--warmup", type=int, default=2_000)
    parser.add_argument("--every", type=int, default=500, help="frames between RSS samples")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "moleflow_soak")
    parser.add_argument("--json", type=Path, help="write the result, with every sample, here")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    reference = old_lists_mb(args.frames)  # first, before training fills the heap with reusable memory
    if args.export is None:
        data, export_dir = tiny_export(args.work)
        images = sorted(p for task in TASKS for p in (data / task / "test").rglob("*.png"))
    else:
        export_dir = args.export
        if args.images is None:
            parser.error("--export needs --images: a folder of frames of its products")
        images = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".bmp"))
    video = soak_video(images, args.frames, args.work / "soak.avi")
    result = soak(export_dir, video, args.frames, args.warmup, args.every)
    result["reference_old_latency_lists_mb"] = round(reference, 2)
    print(f"{result['frames']} frames ({result['errors']} errors, exit {result['exit_code']}) in {result['wall_s']} s, "
          f"{result['frames_per_s']} frames/s; latency ms {result['latency_ms']}")  # fmt: skip
    print(f"RSS {result['rss_mb_at_warmup']} MB after {args.warmup} frames, {result['rss_mb_final']} MB at the end: "
          f"growth {result['growth_mb_after_warmup']} MB (largest {result['max_growth_mb_after_warmup']} MB), "
          f"target < {TARGET_MB} MB")  # fmt: skip
    print(f"reference, same run: the old per-frame latency lists would hold {reference:.2f} MB at {args.frames} frames "
          f"({reference / args.frames * 2_592_000:.0f} MB per day at 30 fps)")  # fmt: skip
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["max_growth_mb_after_warmup"] < TARGET_MB else 1


if __name__ == "__main__":
    sys.exit(main())
