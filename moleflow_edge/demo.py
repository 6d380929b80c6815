"""The demo: the whole path on synthetic products, from images to anomaly maps, in minutes.

Synthetic data -> train three products one after another into a model directory -> eval with
routing -> export (fp32 ONNX) -> calibrate -> bench -> the torch-free runtime over a few frames,
one of them a product never learned, writing overlays. Two sizes: ``QUICK`` (the default,
under 3 minutes on 2 idle cores) and ``FULL`` (the sizes the demo used to run at: 40 training
images per product, 120 steps, every bench target). Only sizes differ; every step runs in both.
"""

from __future__ import annotations

import io
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from moleflow_edge.atomic import OutputError
from moleflow_edge.config import MoleFlowConfig

TASKS = ("weave", "screw", "cap")  # learned in this order
UNSEEN = "tiles"  # never learned: its frame should come back as an unknown product
TARGET_FPR = 0.05  # the synthetic test/good folders hold 20 images: enough for 5%, not for 1%


@dataclass(frozen=True)
class DemoPlan:
    """Every size the demo chooses; the model's own sizes are in ``config``."""

    config: MoleFlowConfig
    steps: int  # most optimiser steps per task (held-out stopping may end sooner)
    n_train: int  # good training images per product
    n_test_good: int  # good test images per product (calibration uses them too)
    n_test_defect: int  # test images per defect kind (4 kinds) per product
    backends: tuple[str, ...] | None  # bench rows (None: every backend; those not installed are listed as skipped)
    bench_iters: int
    task_counts: tuple[int, ...]  # bench's routing/memory growth with the number of tasks
    good_frames: int = 1  # per product, for the runtime's overlays
    defect_frames: int = 2


# the demo trades the papers' sizes for minutes on a laptop CPU; every size is a config field
DEMO_CONFIG = MoleFlowConfig(image_size=160).with_settings(
    "flow", num_mole_blocks=4, num_dia_blocks=2, lora_rank=16, lora_alpha=16, batch_size=8, lr=1e-3
)
QUICK = DemoPlan(
    config=DEMO_CONFIG.with_overrides(augment_copies=2),
    steps=90,
    n_train=30,
    n_test_good=20,
    n_test_defect=3,
    backends=("torch-eager", "onnxruntime-cpu"),
    bench_iters=10,
    task_counts=(1, 5),
)
FULL = DemoPlan(
    config=DEMO_CONFIG,
    steps=120,
    n_train=40,
    n_test_good=20,
    n_test_defect=4,
    backends=None,
    bench_iters=20,
    task_counts=(1, 5, 15),
)


@dataclass(frozen=True)
class DemoOutputs:
    """Where the demo put what it made, all under ``out``."""

    out: Path
    data: Path
    model: Path
    export: Path
    eval_json: Path
    bench_json: Path
    chart: str  # the PNG's path, or why none was written (bench's own words)
    maps: Path
    run_jsonl: Path
    seconds: float

    def summary(self) -> str:
        """The closing lines: where the results, maps and charts are, and what to try next."""
        minutes, seconds = divmod(round(self.seconds), 60)
        return "\n".join(
            [
                f"demo finished in {minutes} min {seconds} s; everything is under {self.out}/",
                f"  results  {self.eval_json}  (per product: image/pixel AUROC, pixel AP, AUPRO, routing; forgetting)",
                f"           {self.bench_json}  (latency per stage and backend, FLOPs, growth with the task count)",
                f"  maps     {self.maps}/  (anomaly-map overlays from the torch-free runtime; {self.run_jsonl.name})",
                f"  charts   {self.chart}  (per-stage latency by backend and batch)"
                if self.chart.endswith(".png")
                else f"  charts   none: {self.chart}",
                f"  model    {self.model}/  (config, shared weights, one file per product)",
                f"  export   {self.export}/  (manifest, ONNX graphs, router: what a line PC runs)",
                f"next: moleflow-edge run --export {self.export} --source {self.data}/screw/test --save {self.out}/mine",
            ]
        )


def _pick_frames(data: Path, frames: Path, plan: DemoPlan) -> None:
    """A few test images of every learned product (good and defective) and one of the unseen product."""
    frames.mkdir(parents=True)
    for task in TASKS:
        test = data / task / "test"
        good = sorted((test / "good").glob("*.png"))[: plan.good_frames]
        defects = sorted(p for p in test.glob("*/*.png") if p.parent.name != "good")
        spread = defects[:: max(1, len(defects) // max(1, plan.defect_frames))][: plan.defect_frames]
        for path in [*good, *spread]:
            shutil.copyfile(path, frames / f"{task}_{path.parent.name}_{path.stem}.png")
    unseen = min((data / UNSEEN / "test" / "good").glob("*.png"))
    shutil.copyfile(unseen, frames / f"{UNSEEN}_never_learned.png")


def run_demo(out: str | Path, plan: DemoPlan = QUICK, steps: int | None = None,
             printer: Callable[[str], None] = print, threads: int | None = None) -> DemoOutputs:  # fmt: skip
    """Run the whole path into ``out`` (which must not hold a model yet) and return where things are.

    ``threads``: torch's intra-op threads for training, eval and export (None: torch's default,
    one per core).
    """
    from moleflow_edge.bench.run import bench as run_bench
    from moleflow_edge.calibration import calibrate as calibrate_export
    from moleflow_edge.data.synth import generate
    from moleflow_edge.evaluate import evaluate, format_eval_table
    from moleflow_edge.export.exporter import export_model
    from moleflow_edge.model_store import ModelStore
    from moleflow_edge.runtime import RunOptions, RunOutcome, RuntimeOptions, run_source
    from moleflow_edge.train import train_task

    root = Path(out)
    data, model, export_dir = root / "data", root / "model", root / "export"
    if ModelStore(model).tasks():
        raise OutputError(f"{model} already holds a model; remove {root} or pass another --out")
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    started = time.perf_counter()
    stage = [started]

    def done(what: str) -> None:
        now = time.perf_counter()
        printer(f"[{now - started:6.1f} s] {what} ({now - stage[0]:.1f} s)")
        stage[0] = now

    size = plan.config.image_size
    generate(data, list(TASKS), seed=0, image_size=size, n_train=plan.n_train, n_test_good=plan.n_test_good,
             n_test_defect=plan.n_test_defect)  # fmt: skip
    generate(data, [UNSEEN], seed=0, image_size=size, n_train=1, n_test_good=1, n_test_defect=0)
    done(f"synthetic data: {', '.join(TASKS)} and {UNSEEN} (never learned) at {size} px in {data}")

    for task in TASKS:
        report = train_task(data, task, model, plan.config, steps or plan.steps)
        done(f"trained {task}: {report.summary}")

    results = evaluate(data, model)
    eval_json = root / "eval.json"
    eval_json.write_text(json.dumps(results, indent=2) + "\n")
    printer(format_eval_table(results))
    done("eval, every test image routed by the prototype router")

    printer(export_model(model, export_dir, None, ["fp32"]).table())
    done(f"export (fp32 ONNX) to {export_dir}")
    printer(calibrate_export(export_dir, data, TARGET_FPR).table())
    done(f"calibrate at {TARGET_FPR:.0%} false positives")

    chart, bench_json = root / "bench.png", root / "bench.json"
    backends = {} if plan.backends is None else {"backends": plan.backends}
    timings = run_bench(export_dir, precisions=("fp32",), batches=(1, 8), iters=plan.bench_iters, data_root=data,
                        model_dir=model, task_counts=plan.task_counts, chart=chart, printer=printer, **backends)  # fmt: skip
    bench_json.write_text(json.dumps(timings, indent=2) + "\n")
    done("bench")

    frames, maps, run_jsonl = root / "frames", root / "maps", root / "run.jsonl"
    _pick_frames(data, frames, plan)
    log = io.StringIO()
    with run_jsonl.open("w") as lines:
        options = RunOptions(export_dir, RuntimeOptions("onnxruntime-cpu"), save_dir=maps)
        outcome = run_source(str(frames), options, out=lines, err=log)
    printer(log.getvalue().rstrip())
    if outcome is not RunOutcome.DONE:
        raise RuntimeError(f"the runtime over {frames} ended {outcome.value}; see {run_jsonl}")
    done(f"runtime over {frames}: overlays in {maps}")

    return DemoOutputs(root, data, model, export_dir, eval_json, bench_json, str(timings["chart"]), maps, run_jsonl,
                       time.perf_counter() - started)  # fmt: skip
