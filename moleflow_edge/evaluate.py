"""Evaluation as deployed: the router picks each test image's adapters, nobody names the product.

Scores come from the runtime itself (runtime.Runtime over the torch backend, torch_backend.py): the
unknown-product limits apply (a rejected image counts as stopped by the line), every task scores
through its detector's scorer (a merged flow or a memory bank), and a rejected image's map is its
best candidate's, exactly as the deployed graphs are run.
Forgetting needs no stored history: the model is strictly additive, so "right after learning
task t" is the same model with a router restricted to tasks 0..t (RuntimeSpec.first). Comparing
that with the router over every task measures forgetting exactly, routing confusion included.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from moleflow_edge.anomaly_map import anomaly_map
from moleflow_edge.config import MoleFlowConfig
from moleflow_edge.data.mvtec import Split, load_split
from moleflow_edge.device import names_batch_on_oom, resolve_device
from moleflow_edge.errors import InputError
from moleflow_edge.features import FEATURE_BATCH
from moleflow_edge.metrics import aupro, auroc, average_precision
from moleflow_edge.model_store import ModelStore
from moleflow_edge.router import UNKNOWN, RouterTable
from moleflow_edge.runtime.result import FrameResult
from moleflow_edge.runtime.runtime import Runtime
from moleflow_edge.torch_backend import runtime_of

METRICS = ("image_auroc", "pixel_auroc", "pixel_ap", "aupro")


@dataclass(frozen=True)
class TaskMetrics:
    image_auroc: float
    pixel_auroc: float
    pixel_ap: float
    aupro: float
    routing_accuracy: float  # the router's nearest task is this one: it knows which product it sees
    unknown_rate: float  # beyond every unknown-product limit: stopped as no known product, as the runtime would


def split_metrics(split: Split, maps: np.ndarray, image: np.ndarray) -> tuple[float, float, float, float]:
    """Image AUROC, pixel AUROC, pixel AP and AUPRO of one test split, from (N,S,S) maps and (N,) scores."""
    return (
        auroc(split.labels, image),
        auroc(split.masks, maps),
        average_precision(split.masks, maps),
        aupro(split.masks, maps),
    )


def anomaly_maps(patch: np.ndarray, config: MoleFlowConfig) -> np.ndarray:
    """(N,H,W) patch scores -> (N,S,S) smoothed maps at the input size."""
    return np.stack([anomaly_map(p, config.image_size, config.map_sigma) for p in patch])


def _metrics(results: list[FrameResult], split: Split) -> tuple[float, float, float, float]:
    """The split's metrics from the runtime's results: a frame stopped as no known product scores +inf
    (the line stops it) and shows the map of the candidate that explains it best."""
    failed = [r.error for r in results if r.error is not None or r.anomaly_map is None]
    if failed:
        raise RuntimeError(f"the runtime could not score every test image: {failed[0]}")
    image = np.array([np.inf if r.image_score is None else r.image_score for r in results], dtype=np.float32)
    return split_metrics(split, np.stack([r.anomaly_map for r in results]), image)  # type: ignore[misc]


def _decisions(router: RouterTable, distances: np.ndarray) -> tuple[list[str], list[tuple[str, ...]]]:
    """What a frame's scores depend on: its routed task, and its candidates where it is unknown."""
    tasks = router.assign(distances)
    return tasks, [c if t == UNKNOWN else () for t, c in zip(tasks, router.candidates(distances), strict=True)]


@names_batch_on_oom(
    f"evaluating (the backbone runs {FEATURE_BATCH} images at a time, a task's detector its routed test images at once)",
    lambda _: "the number of test images per task",
)
def evaluate(
    data_root: str | Path,
    model_dir: str | Path,
    tasks: list[str] | None = None,
    oracle: bool = False,
    device: str | torch.device = "cpu",
) -> dict[str, dict]:
    """Per-task and mean metrics plus the forgetting measure, in the eval --json shape; float32 on ``device``.

    Every figure comes from ``Runtime.infer`` over the trained model, so eval scores as deployed.

    Args:
        data_root: a dataset in the MVTec layout; each task's ``test`` split is read.
        model_dir: a trained model directory.
        tasks: the tasks to evaluate (None: every trained task).
        oracle: score every image under its own product's detector, whatever the router says
            (``as_task``); no forgetting is measured then.
        device: auto, cpu, cuda or cuda:N.

    Returns:
        ``{"tasks": {task: metrics and train_images}, "mean": metrics, "forgetting": per metric,
        "mode": {"routing", "trained_tasks"}}``, the eval --json shape.
    """
    store = ModelStore(model_dir)
    model, prototypes = store.load()
    runtime = runtime_of(store, model.to(resolve_device(device)), prototypes)
    spec, backend = runtime.spec, runtime.graphs
    order = runtime.tasks
    wanted = order if tasks is None else tasks
    unknown = [t for t in wanted if t not in order]
    if unknown:
        raise InputError(f"tasks {unknown} are not trained in {model_dir} (trained: {order})")

    results: dict[str, TaskMetrics] = {}
    forgetting: dict[str, list[float]] = {m: [] for m in METRICS}
    for task in wanted:
        split = load_split(data_root, task, "test", spec.image_size)
        scored = runtime.infer(split.images, as_task=task if oracle else None)
        distances = np.array([[r.distances[t] for t in order] for r in scored], dtype=np.float32)
        final = _metrics(scored, split)
        results[task] = TaskMetrics(
            *final,
            float(np.mean([t == task for t in runtime.router.nearest(distances)])),
            float(np.mean([t == UNKNOWN for t in runtime.router.assign(distances)])),
        )
        position = order.index(task)
        if position < len(order) - 1 and not oracle:  # an earlier task: the model right after it was learned
            then = Runtime.over(spec.first(position + 1), backend)
            then_metrics = (  # the same decisions score bit-identically: the detectors need not run again
                final
                if _decisions(then.router, distances[:, : position + 1]) == _decisions(runtime.router, distances)
                else _metrics(then.infer(split.images), split)
            )
            for name, before, after in zip(METRICS, then_metrics, final, strict=True):
                forgetting[name].append(before - after)

    per_task = {t: {**asdict(m), "train_images": prototypes[t].images} for t, m in results.items()}
    mean = {k: float(np.mean([m[k] for m in per_task.values()])) for k in asdict(next(iter(results.values())))}
    return {
        "tasks": per_task,
        "mean": mean,
        "forgetting": {k: float(np.mean(v)) if v else 0.0 for k, v in forgetting.items()},
        "mode": {"routing": "oracle" if oracle else "routed", "trained_tasks": order},
    }


def format_eval_table(results: dict) -> str:
    """A plain table of the eval results, one row per task plus the mean and forgetting."""
    names = ["image_auroc", "pixel_auroc", "pixel_ap", "aupro", "routing_accuracy", "unknown_rate"]
    lines = [f"{'task':<16}" + "".join(f"{n:>18}" for n in names)]
    for task, metrics in [*results["tasks"].items(), ("mean", results["mean"])]:
        lines.append(f"{task:<16}" + "".join(f"{metrics[n]:>18.4f}" for n in names))
    forgetting = results["forgetting"]
    lines.append(f"{'forgetting':<16}" + "".join(f"{forgetting[n]:>18.4f}" for n in names if n in forgetting))
    return "\n".join(lines)
