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
cores the wall time lies between CPU/2 and CPU).

With --line, the line keeps running through it: a `moleflow-edge serve` on the export (127.0.0.1, free
ports) answers a client that sends a frame of the new product every 0.25 s, and a `moleflow-edge run
--follow` on the export takes a frame of it dropped into its folder every 0.25 s; both were started
before `learn`, never restarted. Reported: seconds from learn's start to the first frame each scores
as the new product, and the frames each answered with an error (must be 0). Both compete with learn
for the 2 cores, as on a line PC.
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
import threading
import time
from pathlib import Path

TASKS, NEW = ["weave", "tiles"], "screw"
SETUP_STEPS = 30  # task 0's shared flow parts: only their existence matters to a memory task's cost
PACE_S, LINE_LIMIT_S = 0.25, 300.0  # a frame every PACE_S; the line watchers give up after LINE_LIMIT_S
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


class LineWatch:
    """A frame of the new product every PACE_S through a running serve and a running `run --follow`, from
    before learn starts until both score it as the new product (or LINE_LIMIT_S): when, and errors."""

    def __init__(self, export: Path, work: Path, source: Path) -> None:
        from moleflow_edge.serving.serve_process import ServeProcess

        self.frame_file = min(source.glob("*.png"))
        self.drop = work / "drop"
        shutil.rmtree(self.drop, ignore_errors=True)
        self.drop.mkdir(parents=True)
        self.server = ServeProcess(export, work / "serve.log").__enter__()
        self.run = subprocess.Popen(  # noqa: SIM115 - stopped in finish()
            [sys.executable, "-m", "moleflow_edge.cli", "run", "--export", str(export), "--source", str(self.drop),
             "--follow", "--max-frames", str(int(LINE_LIMIT_S / PACE_S))],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        self.began = time.perf_counter()
        self.seen: dict[str, float] = {}
        self.errors = {"serve": 0, "run": 0}
        self.threads = [threading.Thread(target=f, daemon=True) for f in (self._serve, self._drop, self._read)]

    def start(self) -> None:
        self.began = time.perf_counter()
        for t in self.threads:
            t.start()

    def _done(self, name: str) -> bool:
        return name in self.seen or time.perf_counter() - self.began > LINE_LIMIT_S

    def _serve(self) -> None:
        import cv2

        from moleflow_edge.serving.client import RemoteRuntime

        frame = cv2.imread(str(self.frame_file))
        with RemoteRuntime(self.server.http, retries=0) as remote:
            while not self._done("serve"):
                result = remote.infer([frame], with_maps=False)[0]
                self.errors["serve"] += result.error is not None
                if result.task == NEW:
                    self.seen["serve"] = time.perf_counter() - self.began
                time.sleep(PACE_S)

    def _drop(self) -> None:
        for k in range(int(LINE_LIMIT_S / PACE_S)):
            if self._done("run"):
                return
            partial = self.drop / f".{k:05d}.png"  # hidden while written: taken once renamed
            shutil.copyfile(self.frame_file, partial)
            partial.rename(self.drop / f"{k:05d}.png")
            time.sleep(PACE_S)

    def _read(self) -> None:
        for line in self.run.stdout:  # type: ignore[union-attr]
            record = json.loads(line) if line.startswith("{") else {}
            self.errors["run"] += bool(record.get("error"))
            if record.get("task") == NEW and "run" not in self.seen:
                self.seen["run"] = time.perf_counter() - self.began

    def finish(self) -> dict[str, object]:
        """Wait for both (bounded), stop both; seconds from learn's start to the first frame scored as NEW."""
        deadline = self.began + LINE_LIMIT_S
        while len(self.seen) < 2 and time.perf_counter() < deadline:
            time.sleep(PACE_S)
        self.run.terminate()
        self.run.wait(30)
        self.server.stop()
        return {"first_scored_as_new_s": dict(self.seen), "frames_with_errors": self.errors}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "moleflow_learn_bench")
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--size", type=int, default=320, help="side of the new product's frames in pixels")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--line", action="store_true", help="a running serve and run --follow pick the product up")
    args = parser.parse_args()

    model, export, source = build(args.work, args.frames, args.size)
    run = args.work / "run"  # a fresh copy of the line's model and export for every measurement
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(model, run / "model")
    shutil.copytree(export, run / "export")
    command = [sys.executable, "-m", "moleflow_edge.cli", "learn", "--source", str(source), "--task", NEW,
               "--model", str(run / "model"), "--export", str(run / "export"), "--detector", "memory",
               "--frames", str(args.frames), "--threads", "2", "--device", "cpu"]  # fmt: skip
    line = None
    try:
        if args.line:
            line = LineWatch(run / "export", args.work, source)
            line.start()
        began, cpu_before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
        wall, cpu_after = time.perf_counter() - began, resource.getrusage(resource.RUSAGE_CHILDREN)
    finally:
        picked = None if line is None else line.finish()
    cpu = (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
    if done.returncode != 0:
        print(done.stdout, done.stderr, file=sys.stderr)
        return 1
    total, read, train, exported, calibrated = map(float, DONE.search(done.stdout).groups())  # type: ignore[union-attr]
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}",
        "frames": args.frames,
        "frame_size": args.size,
        "seconds": {
            "read": read,
            "train": train,
            "export": exported,
            "calibrate": calibrated,
            "first_frame_to_calibrated_export": total,
            "command_wall": round(wall, 2),
            "command_cpu": round(cpu, 2),
        },  # fmt: skip
        "learn_output": done.stdout.strip().splitlines(),
    }
    if picked is not None:
        report["line"] = picked
    text = json.dumps(report, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
