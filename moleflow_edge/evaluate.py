"""Evaluation as deployed: the router picks each test image's adapters, nobody names the product.

Scores come from moleflow_edge.scoring, the runtime's rule: the unknown-product limits apply
(a rejected image counts as stopped by the line) and every task scores through its detector's
scorer (a merged flow or a memory bank).
Forgetting needs no stored history: the model is strictly additive, so "right after learning
task t" is the same model with a router restricted to tasks 0..t. Comparing that with the
router over every task measures forgetting exactly, routing confusion included.
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
from moleflow_edge.features import FEATURE_BATCH, extract_features
from moleflow_edge.metrics import aupro, auroc, average_precision
from moleflow_edge.model_store import ModelStore
from moleflow_edge.router import UNKNOWN
from moleflow_edge.scoring import RoutedScores, TaskDetectors, route, router_table, score_routed

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


def _metrics(scores: RoutedScores, split: Split, config: MoleFlowConfig) -> tuple[float, float, float, float]:
    return split_metrics(split, anomaly_maps(scores.patch, config), scores.image)


@names_batch_on_oom(
    f"evaluating (the backbone runs {FEATURE_BATCH} images at a time, a task's flow its whole test split at once)",
    lambda _: "the number of test images per task",
)
def evaluate(
    data_root: str | Path,
    model_dir: str | Path,
    tasks: list[str] | None = None,
    oracle: bool = False,
    device: str | torch.device = "cpu",
) -> dict[str, dict]:
    """Per-task and mean metrics plus the forgetting measure, in the eval --json shape; float32 on ``device``."""
    device = resolve_device(device)
    store = ModelStore(model_dir)
    model, prototypes = store.load()
    model.to(device)
    order = model.tasks
    wanted = order if tasks is None else tasks
    unknown = [t for t in wanted if t not in order]
    if unknown:
        raise InputError(f"tasks {unknown} are not trained in {model_dir} (trained: {order})")
    table = router_table(model, prototypes)
    detectors = TaskDetectors(model)

    results: dict[str, TaskMetrics] = {}
    forgetting: dict[str, list[float]] = {m: [] for m in METRICS}
    for task in wanted:
        split = load_split(data_root, task, "test", model.config.image_size)
        features = extract_features(model, split.images)
        if oracle:  # every image under its own product's detector, whatever the router says
            named = [task] * len(split.images)
            routing = route(table, features.routing)
            scores = RoutedScores(routing, named, *detectors.score(model.embed(features.concat), named))
        else:
            scores = score_routed(detectors, table, features)
            routing = scores.routing
        final = _metrics(scores, split, model.config)
        results[task] = TaskMetrics(
            *final,
            float(np.mean([t == task for t in routing.nearest])),
            float(np.mean([t == UNKNOWN for t in routing.tasks])),
        )
        position = order.index(task)
        if position < len(order) - 1 and not oracle:  # an earlier task: the model right after it was learned
            then_metrics = (  # the same routing scores bit-identically: the detectors need not run again
                final
                if route(table, features.routing, position + 1) == routing
                else _metrics(score_routed(detectors, table, features, position + 1), split, model.config)
            )
            for name, before, after in zip(METRICS, then_metrics, final):
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
