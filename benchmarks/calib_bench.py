"""Calibration + bench on a default-size model: the numbers in benchmarks/README.md, "Calibration & bench".

python benchmarks/calib_bench.py [WORK]     (default runs/calib_bench; data, model, export reused)
"""

import json
import sys
import time
from pathlib import Path

from moleflow_edge.bench.run import bench
from moleflow_edge.calibration import CalibrationError, calibrate
from moleflow_edge.config import MoleFlowConfig
from moleflow_edge.data.synth import generate
from moleflow_edge.export.exporter import export_model
from moleflow_edge.train import train_task

work = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/calib_bench")
data, model, export = work / "data", work / "model", work / "export"
tasks = ["weave", "screw"]
if not (export / "manifest.json").is_file():
    generate(data, tasks, seed=0, image_size=224, n_train=40, n_test_good=40, n_test_defect=6)
    cfg = MoleFlowConfig(epochs=2)
    for t in tasks:
        train_task(data, t, model, cfg, progress=False)
    export_model(model, export, precisions=("fp32", "int8"), calib_data=data)
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
