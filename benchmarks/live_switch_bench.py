"""Live pick-up: frames dropped and latency while a running line switches to a newly committed export.

    python benchmarks/live_switch_bench.py [--work DIR] [--steady 200] [--after 200] [--json OUT]

Trains three synthetic memory products (weave, tiles, screw; 128 px, seconds each) under --work and
exports the first two. Then the camera loop's path (LiveExport.current() before each frame, then
Runtime.infer, onnxruntime CPU, one thread) scores frames back to back, one per batch: --steady
frames, then `moleflow-edge export --task screw` starts in another process and commits the third
product into the same folder while frames go on, and --after frames follow the switch (a third of
them screw's).

Reported, all from the same run: frames dropped (submitted minus scored without error; must be 0),
latency p50/p99 in steady state (before the export started), while the exporter runs beside the
loop (it shares the CPU), of the one frame that carried the switch (the manifest's verification,
the router's load), of the 50 frames after it (screw's engine loads on its first frame) and of the
rest. Latency is from asking LiveExport for the runtime to the result.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

TASKS, NEW = ["weave", "tiles"], "screw"
AFTER_SWITCH = 50  # frames right after the switch, reported apart
EXPORT_LIMIT_S = 900  # the exporter must commit within this, else the bench fails


def build(work: Path) -> tuple[Path, Path, Path]:
    """Data, a model of three memory products and an export of the first two (reused under ``work``)."""
    from moleflow_edge.config import DetectorKind, MoleFlowConfig
    from moleflow_edge.data.synth import generate
    from moleflow_edge.export.exporter import export_model
    from moleflow_edge.model_store import ModelStore
    from moleflow_edge.train import train_task

    data, model, export = work / "data", work / "model", work / "export"
    if not data.is_dir():
        generate(data, [*TASKS, NEW], seed=0, image_size=128, n_train=20, n_test_good=6, n_test_defect=2)
    config = MoleFlowConfig(image_size=128, embed_dim=64, augment_copies=0).with_settings(
        "flow", num_mole_blocks=2, num_dia_blocks=1, lora_rank=8, lora_alpha=8.0
    )
    for task in [*TASKS, NEW]:
        if task not in ModelStore(model).tasks():
            train_task(data, task, model, config, progress=False, detector=DetectorKind.MEMORY)
    shutil.rmtree(export, ignore_errors=True)  # the line's starting export, made anew: the bench commits into it
    export_model(model, export, tasks=TASKS)
    return data, model, export


def percentiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"n": len(values), "p50": round(float(np.percentile(values, 50)), 2),
            "p99": round(float(np.percentile(values, 99)), 2), "max": round(max(values), 2)}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "moleflow_live_switch")
    parser.add_argument("--steady", type=int, default=200)
    parser.add_argument("--after", type=int, default=200)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from moleflow_edge.runtime import Runtime, RuntimeOptions
    from moleflow_edge.runtime.live_export import LiveExport

    data, model, export = build(args.work)
    frames = {
        t: [cv2.imread(str(p)) for p in sorted((data / t / "test" / "good").glob("*.png"))] for t in [*TASKS, NEW]
    }
    said: list[str] = []
    live = LiveExport(Runtime.load(export, RuntimeOptions(threads=1)), said.append)
    latencies, tasks, errors = [], [], 0
    exporter, switched_at, i = None, None, 0
    with live:
        while switched_at is None or i < switched_at + 1 + args.after:
            if i == args.steady:
                command = [sys.executable, "-m", "moleflow_edge.cli", "export", "--model", str(model), "--task", NEW,
                           "--out", str(export)]  # fmt: skip
                exporter = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                deadline = time.monotonic() + EXPORT_LIMIT_S
            if exporter is not None and switched_at is None and time.monotonic() > deadline:
                exporter.kill()
                print(f"the export did not commit within {EXPORT_LIMIT_S} s", file=sys.stderr)
                return 1
            product = [*TASKS, NEW][i % 3] if switched_at is not None else TASKS[i % 2]
            frame = frames[product][i % len(frames[product])]
            began = time.perf_counter()
            runtime = live.current()
            result = runtime.infer_one(frame, with_maps=False)
            latencies.append((time.perf_counter() - began) * 1e3)
            live.record([i])
            errors += result.error is not None
            tasks.append((product, result.task))
            if switched_at is None and len(live.uses) > 1:
                switched_at = i
            i += 1
        _, err = exporter.communicate(timeout=EXPORT_LIMIT_S)  # type: ignore[union-attr]
        if exporter.returncode != 0:  # type: ignore[union-attr]
            print(err.decode(), file=sys.stderr)
            return 1
    window_end = switched_at + 1 + AFTER_SWITCH
    new_product = [got for product, got in tasks[switched_at:] if product == NEW]
    report = {
        "frames_submitted": i,
        "frames_scored": i - errors,
        "frames_dropped": errors,
        "export_started_at_frame": args.steady,
        "switched_at_frame": switched_at,
        "new_product_frames_scored_as_it": f"{new_product.count(NEW)}/{len(new_product)}",
        "latency_ms": {
            "steady": percentiles(latencies[: args.steady]),
            "while_exporting": percentiles(latencies[args.steady : switched_at]),
            "switch_frame": round(latencies[switched_at], 2),
            f"next_{AFTER_SWITCH}": percentiles(latencies[switched_at + 1 : window_end]),
            "after": percentiles(latencies[window_end:]),
        },
        "switch_log": said,
        "exports": live.summary()["exports"],
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
