"""How long `moleflow-edge learn --detector memory` takes to add a product to a line, stage by stage.

    python benchmarks/learn_bench.py [--work DIR] [--frames 30] [--size 320] [--json OUT]

Setup (not timed, reused under --work): two synthetic products (weave, tiles) learned as memory
tasks into a model with the default config (EfficientNet-Lite0 at 224 px; task 0 fits the shared
flow parts first, here with 30 steps, since only their existence matters), exported (fp32) and
calibrated: the line's export. Then --frames good frames of a third product (screw, --size px
PNGs in a folder, as a line camera's drop folder holds them) are learned into a fresh copy of
that model and export by the real command in a new process: `moleflow-edge learn --source FOLDER
--task screw --detector memory --threads 2`. Reported: learn's own stages (read: frames taken
and the dataset written; train; export: the incremental export committed; calibrate: the
threshold committed), its total from the first frame read to the calibrated export committed,
the command's wall time (Python and torch start-up included) and the CPU seconds it used (user +
system: on a shared machine the wall time grows with the load, the CPU time much less; on 2 idle
cores the wall time lies between CPU/2 and CPU). A running `run` or `serve`
that follows its export's commits picks the product up at its next batch after that.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TASKS, NEW = ["weave", "tiles"], "screw"
SETUP_STEPS = 30  # task 0's shared flow parts: only their existence matters to a memory task's cost
DONE = re.compile(r"done in ([\d.]+) s \(read ([\d.]+), train ([\d.]+), export ([\d.]+), calibrate ([\d.]+) s\)")


def build(work: Path, frames: int, size: int) -> tuple[Path, Path, Path]:
    """The line's model and calibrated export (two memory products), and a folder of the new product's frames."""
    from moleflow_edge.calibration import calibrate
    from moleflow_edge.config import DetectorKind
    from moleflow_edge.data.synth import generate
    from moleflow_edge.export.exporter import export_model
    from moleflow_edge.model_store import ModelStore
    from moleflow_edge.train import train_task

    data, model, export = work / "data", work / "model", work / "export"
    if not data.is_dir():
        generate(data, TASKS, seed=0, image_size=224, n_train=30, n_test_good=10, n_test_defect=1)
    for task in TASKS:
        if task not in ModelStore(model).tasks():
            train_task(data, task, model, steps=SETUP_STEPS, progress=False, detector=DetectorKind.MEMORY)
    if not (export / "manifest.json").is_file():
        export_model(model, export)
        calibrate(export, data, target_fpr=0.1)
    source = work / f"frames{frames}_{size}"
    if not source.is_dir():
        generate(work / "new", [NEW], seed=1, image_size=size, n_train=frames, n_test_good=1, n_test_defect=0)
        shutil.copytree(work / "new" / NEW / "train" / "good", source)
    return model, export, source


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "moleflow_learn_bench")
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--size", type=int, default=320, help="side of the new product's frames in pixels")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    model, export, source = build(args.work, args.frames, args.size)
    run = args.work / "run"  # a fresh copy of the line's model and export for every measurement
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(model, run / "model")
    shutil.copytree(export, run / "export")
    command = [sys.executable, "-m", "moleflow_edge.cli", "learn", "--source", str(source), "--task", NEW,
               "--model", str(run / "model"), "--export", str(run / "export"), "--detector", "memory",
               "--frames", str(args.frames), "--threads", "2", "--device", "cpu"]  # fmt: skip
    began, cpu_before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    wall, cpu_after = time.perf_counter() - began, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
    if done.returncode != 0:
        print(done.stdout, done.stderr, file=sys.stderr)
        return 1
    total, read, train, exported, calibrated = map(float, DONE.search(done.stdout).groups())  # type: ignore[union-attr]
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}",
        "frames": args.frames,
        "frame_size": args.size,
        "seconds": {"read": read, "train": train, "export": exported, "calibrate": calibrated,
                    "first_frame_to_calibrated_export": total, "command_wall": round(wall, 2),
                    "command_cpu": round(cpu, 2)},  # fmt: skip
        "learn_output": done.stdout.strip().splitlines(),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
