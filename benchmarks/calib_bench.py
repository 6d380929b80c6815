"""Calibration + bench on a default-size model: the numbers in benchmarks/README.md, "Calibration & bench".

python benchmarks/calib_bench.py [WORK] [--steps 6]     (default runs/calib_bench; data, model, export reused)

The model trains for at most --steps optimiser steps per task (6 = the old 2 epochs of 40 images
at batch 16).
"""

import argparse
import json
import time
from pathlib import Path

from moleflow_edge.bench.run import bench
from moleflow_edge.calibration import CalibrationError, calibrate
from moleflow_edge.config import MoleFlowConfig
from moleflow_edge.data.synth import generate
from moleflow_edge.export.exporter import export_model
from moleflow_edge.train import train_task

TASKS = ["weave", "screw"]


def prepare(work: Path, steps: int) -> tuple[Path, Path, Path]:
    """Synthetic data, a default-size model trained for at most ``steps`` optimiser steps per task and
    its fp32 + int8 export under ``work`` (reused when the export is there, whatever ``steps`` it had)."""
    data, model, export = work / "data", work / "model", work / "export"
    if not (export / "manifest.json").is_file():
        generate(data, TASKS, seed=0, image_size=224, n_train=40, n_test_good=40, n_test_defect=6)
        cfg = MoleFlowConfig().with_settings("flow", max_steps=steps)
        for t in TASKS:
            train_task(data, t, model, cfg, progress=False)
        export_model(model, export, precisions=("fp32", "int8"), calib_data=data)
    return data, model, export


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", nargs="?", type=Path, default=Path("runs/calib_bench"), help="data, model, export")
    parser.add_argument("--steps", type=int, default=6, help="optimiser steps per task at most")
    args = parser.parse_args()
    work: Path = args.work
    data, model, export = prepare(work, args.steps)
    try:
        calibrate(export, data, target_fpr=0.01)
    except CalibrationError as e:
        print("REFUSED:", e)
    t = time.perf_counter()
    r = calibrate(export, data, target_fpr=0.025)
    print(f"calibrate {time.perf_counter() - t:.1f}s")
    print(r.table())
    print(json.dumps(r.int8_calibration)[:400])
    out = bench(export, iters=20, data_root=data, model_dir=model, chart=work / "bench.png", threads=None)
    (work / "bench.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
