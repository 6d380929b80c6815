"""Export benchmark: export time, file sizes, parity with PyTorch and CPU latency per graph.

Prints markdown tables (asserts nothing). Trains a default-size model (224 px,
EfficientNet-Lite0, D=152, M=6, N=2, r=64) for a few optimiser steps (--steps, at most; 6 = the
old 2 epochs of 40 images at batch 16) on synthetic data: the timings are what matter, the
accuracy columns compare precisions on the same weights.

    python benchmarks/export_bench.py [--work DIR] [--steps 6] [--threads N]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from moleflow_edge.bench.measure import measure_calls
from moleflow_edge.config import MoleFlowConfig
from moleflow_edge.contract import Manifest, load_manifest
from moleflow_edge.data.mvtec import load_split
from moleflow_edge.data.synth import generate
from moleflow_edge.detectors.flow.merged import merge_task
from moleflow_edge.detectors.flow.parts import patch_scores
from moleflow_edge.detectors.registry import score_images
from moleflow_edge.export.exporter import export_model
from moleflow_edge.metrics import auroc
from moleflow_edge.model.continual_model import ContinualModel
from moleflow_edge.model_store import ModelStore
from moleflow_edge.train import train_task

TASKS = ["weave", "screw"]
PRECISIONS = ("fp32", "fp16", "int8")


def prepare(data: Path, model_dir: Path, steps: int) -> None:
    """Synthetic data and a default-size model trained for at most ``steps`` optimiser steps per task
    (reused when ``model_dir`` already holds one, whatever ``steps`` it was trained with)."""
    if (model_dir / "tasks.json").is_file():
        return
    generate(data, categories=TASKS, seed=0, image_size=224, n_train=40, n_test_good=20, n_test_defect=6)
    cfg = MoleFlowConfig().with_settings("flow", max_steps=steps)
    for task in TASKS:
        train_task(data, task, model_dir, cfg, progress=False)


def session(path: Path, threads: int, reference_qdq: bool = False) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # idle onnxruntime workers spin for a while after each run and would slow the eager calls
    # that take their turn next
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if reference_qdq:  # Q/DQ as written: TensorRT's arithmetic, no onnxruntime u8s8 fusion
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--steps", type=int, default=6, help="optimiser steps per task at most (timing only)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=10, help="latency rounds, 3 timed calls per graph each")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # onnxruntime.quantization's advice to pre-process
    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="export_bench_"))
    data, model_dir, out = work / "data", work / "model", work / "export"

    prepare(data, model_dir, args.steps)
    model, _ = ModelStore(model_dir).load()
    cfg = model.config
    flow = cfg.section("flow")
    print(f"model: {cfg.backbone} {cfg.image_size}px D={cfg.embed_dim} M={flow.num_mole_blocks} "
          f"N={flow.num_dia_blocks} r={flow.lora_rank}, max_steps={flow.max_steps}, {args.threads} CPU threads\n")  # fmt: skip

    shutil.rmtree(out, ignore_errors=True)  # time a full export, not a no-op
    started = time.perf_counter()
    report = export_model(model_dir, out, precisions=PRECISIONS, calib_data=data)
    total = time.perf_counter() - started
    print(f"## Export ({total:.1f} s in all)\n\n| file | MiB | s |\n|---|---:|---:|")
    for f in report.files:
        print(f"| {f.file} | {f.bytes / 2**20:.2f} | {f.seconds:.1f} |")
    again = time.perf_counter()
    export_model(model_dir, out, precisions=PRECISIONS, calib_data=data)
    print(f"\nre-export, nothing changed: {time.perf_counter() - again:.2f} s (every file up to date)\n")

    manifest = load_manifest(out)
    tests = {t: load_split(data, t, "test", cfg.image_size) for t in TASKS}
    print("## Parity with PyTorch (onnxruntime CPU; int8 with Q/DQ as written)\n")
    print("| precision | backbone | flow | task | max rel err patch | image AUROC | PyTorch AUROC |")
    print("|---|---|---|---|---:|---:|---:|")
    combos = [(p, p) for p in PRECISIONS] + [("int8", "fp32"), ("fp32", "int8")]
    for backbone_p, flow_p in combos:
        backbone = session(out / manifest.backbone_graphs[backbone_p].file, args.threads, backbone_p == "int8")
        for task, split in tests.items():
            reference_patch, reference_image = score_images(model, split.images, task)
            embedding = backbone.run(None, {"images": split.images})[0]
            flow_file = out / manifest.task(task).graphs[flow_p].file
            patch, image = session(flow_file, args.threads, flow_p == "int8").run(None, {"embedding": embedding})
            err = float(np.max(np.abs(patch - reference_patch.numpy()) / np.abs(reference_patch.numpy())))
            name = backbone_p if backbone_p == flow_p else "mixed"
            print(f"| {name} | {backbone_p} | {flow_p} | {task} | {err:.2e} | {auroc(split.labels, image):.4f} "
                  f"| {auroc(split.labels, reference_image.numpy()):.4f} |")  # fmt: skip

    print("\n## CPU latency, ms (median, interleaved; onnxruntime vs PyTorch eager in this run)\n")
    print("| graph | precision | batch | onnxruntime | PyTorch eager | ratio |\n|---|---|---:|---:|---:|---:|")
    for batch in (1, 8):
        images = np.resize(tests[TASKS[0]].images, (batch, *tests[TASKS[0]].images.shape[1:]))
        latency_rows(model, out, manifest, TASKS[0], images, args.threads, args.repeats)
    print("\nratio = PyTorch eager ms / onnxruntime ms (above 1: the exported graph is faster)")


@torch.no_grad()
def latency_rows(
    model: ContinualModel, out: Path, manifest: Manifest, task: str, images: np.ndarray, threads: int, repeats: int
) -> None:
    """Print one batch size's rows: every graph and precision against the eager model."""
    batch = len(images)
    x = torch.from_numpy(images)
    maps = model.backbone_maps(x)
    embedded = model.embed(model.patch_concat(maps))
    emb, feature = embedded.numpy(), model.routing_feature(maps).numpy()
    merged = merge_task(model, task)
    calls: dict[str, Callable[[], object]] = {
        "eager backbone": lambda: model.embed(model.patch_concat(model.backbone_maps(x))),
        "eager flow": lambda: patch_scores(model, embedded, task),
        "eager merged flow": lambda: merged(embedded),
    }
    for precision in PRECISIONS:
        backbone = session(out / manifest.backbone_graphs[precision].file, threads)
        flow = session(out / manifest.task(task).graphs[precision].file, threads)
        calls[f"{precision} backbone"] = partial(backbone.run, None, {"images": images})
        calls[f"{precision} flow"] = partial(flow.run, None, {"embedding": emb})
    router = session(out / manifest.router_graph.file, threads)  # type: ignore[union-attr]
    calls["fp32 router"] = partial(router.run, None, {"routing_feature": feature})
    ms = {name: p["p50"] for name, p in measure_calls(calls, 3 * repeats, rounds=repeats).items()}
    for precision in PRECISIONS:
        for graph in ("backbone", "flow"):
            ort_ms, eager = ms[f"{precision} {graph}"], ms[f"eager {graph}"]
            print(f"| {graph} | {precision} | {batch} | {ort_ms:.2f} | {eager:.2f} | {eager / ort_ms:.2f}x |")
    print(f"| router | fp32 | {batch} | {ms['fp32 router']:.3f} | - | - |")
    print(f"| merged flow (torch eager) | fp32 | {batch} | - | {ms['eager merged flow']:.2f} | "
          f"{ms['eager flow'] / ms['eager merged flow']:.2f}x vs unmerged |")  # fmt: skip


if __name__ == "__main__":
    main()
