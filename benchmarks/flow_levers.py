"""The flow's levers under its restated target (issue 23, item 6), against the references of the same run.

Every product of an MVTec-layout root goes through the backbone once (training images and their
photometric variants, test images, good test images at gains 0.9 and 1.1); every flow below is
then learned from those cached maps as one continual model over the products in order, with the
trainer's own fit (the flow detector's: held-out stopping, feature noise, Mahalanobis whitening,
as ``train_task`` runs it), and scored per product under its own task (oracle routing):

  default            the default config: PatchCore's 3x3 average on both maps before the embedding;
  aggregation 1 / 5  the same with no local average, or a 5x5 one;
  spatial context    ``spatial_context: true`` (mixer and context-aware coupling scales);
  stride-8 / 16 map  one context-free flow on one backbone map's channels of the default features;
  fused, max / mean  two flows' patch scores, each standardised by the mean and standard deviation
                     of its scores on the task's held-out normal images, then their max (the
                     issue's rule) or mean; image score = the config's top-k mean of the fused map.

The kNN and Gaussian references of accuracy_bench.py score the default features in the same run
(and, for information, the features of each aggregation). Latency: each flow's merged graph
exported to ONNX and run by onnxruntime (CPU, fp32, batch 1, 1 thread, median); a fused detector
costs the sum of its two graphs. Means over products with at least SMOKE_IMAGES training images.

    python benchmarks/flow_levers.py --data ../shared/data/real-dev [--config cfg.json] [--out runs/levers]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from accuracy_bench import (
    GAINS,
    METRICS,
    SMOKE_IMAGES,
    GaussianReference,
    KnnReference,
    exposure,
    max_patch,
    with_gain,
    write_results,
)

from moleflow_edge.augment import photometric_variants
from moleflow_edge.backbones import Backbone, BackboneMaps, build_backbone
from moleflow_edge.config import DetectorKind, MoleFlowConfig
from moleflow_edge.data.mvtec import Split, list_categories, load_split
from moleflow_edge.detectors.base import FitOptions, TrainingSet
from moleflow_edge.detectors.registry import build_model, kind_of
from moleflow_edge.evaluate import anomaly_maps, split_metrics
from moleflow_edge.export.onnx_graphs import scorer_graph
from moleflow_edge.features import FEATURE_BATCH
from moleflow_edge.model.embedding import FeatureEmbedder, patch_concat
from moleflow_edge.train import holdout_split

TIMING_RUNS = 300


@dataclass(frozen=True)
class Flow:
    """One flow to learn: the local-average kernel of its features, which of their channels it
    sees (None: all), and config overrides."""

    kernel: int = 3
    channels: str | None = None  # "stride8" or "stride16": one backbone map's part of the features
    spatial_context: bool = False


FLOWS = {
    "default": Flow(),
    "aggregation 1 (none)": Flow(kernel=1),
    "aggregation 5": Flow(kernel=5),
    "spatial context": Flow(spatial_context=True),
    "stride-8 map": Flow(channels="stride8"),
    "stride-16 map": Flow(channels="stride16"),
}
FUSED = {"default + spatial context": ("default", "spatial context"), "per map": ("stride-8 map", "stride-16 map")}
FUSIONS = ("max", "mean")


@dataclass
class ProductMaps:
    """A product's backbone maps, computed once: training variants (originals first), test, good at gains."""

    train: list[BackboneMaps]
    test: BackboneMaps
    split: Split
    gains: dict[float, BackboneMaps]


@dataclass(frozen=True)
class FlowScores:
    """One flow's patch scores on a product: held-out normal images, test split, good images per gain."""

    held: np.ndarray
    test: np.ndarray
    gains: dict[float, np.ndarray]


@torch.no_grad()
def backbone_maps(backbone: Backbone, images: np.ndarray) -> BackboneMaps:
    parts = [backbone(torch.from_numpy(np.ascontiguousarray(images[i : i + FEATURE_BATCH])), with_last=False)
             for i in range(0, len(images), FEATURE_BATCH)]  # fmt: skip
    return BackboneMaps(torch.cat([p.stride8 for p in parts]), torch.cat([p.stride16 for p in parts]), None)


def product_maps(backbone: Backbone, root: Path, product: str, config: MoleFlowConfig) -> ProductMaps:
    images = load_split(root, product, "train", config.image_size).images
    variants = [images, *photometric_variants(images, config.augment_copies, config.augment_strength, config.seed)]
    test = load_split(root, product, "test", config.image_size)
    good = test.images[~test.labels.astype(bool)]
    return ProductMaps(
        [backbone_maps(backbone, v) for v in variants],
        backbone_maps(backbone, test.images),
        test,
        {g: backbone_maps(backbone, with_gain(good, g)) for g in (1.0, *GAINS)},
    )


def features(maps: BackboneMaps, flow: Flow, config: MoleFlowConfig, channels8: int) -> torch.Tensor:
    concat = patch_concat(maps, config.patch_stride, flow.kernel)
    part = {None: slice(None), "stride8": slice(None, channels8), "stride16": slice(channels8, None)}[flow.channels]
    return concat[:, part]


def learn(flow: Flow, config: MoleFlowConfig, backbone: Backbone, cache: dict[str, ProductMaps]) -> tuple[dict, float]:
    """One continual model over the cached products; each product's scores under its own task, and
    the ms per image of one task's merged flow graph (every task's graph has the same ops)."""
    config = config.with_settings("flow", spatial_context=flow.spatial_context)
    width = features(cache[next(iter(cache))].test, flow, config, backbone.channels8).shape[1]
    config = config.with_overrides(embed_dim=min(config.embed_dim, width))
    torch.manual_seed(config.seed)
    model = build_model(config, backbone)
    model.embedder = FeatureEmbedder(width, config.embed_dim, config.grid_size, 0, config.positional_encoding)
    scores, device = {}, torch.device("cpu")
    for product, maps in cache.items():
        print(f"  learning {product}", flush=True)
        torch.manual_seed(config.seed)
        concat = torch.stack([features(m, flow, config, backbone.channels8) for m in maps.train])
        training = TrainingSet(concat, *holdout_split(concat.shape[1], config.holdout_fraction, config.seed))
        flow_kind = kind_of(DetectorKind.FLOW)  # train_task's own fit: whitening, noise, held-out stopping
        model.add_task(product, flow_kind)
        flow_kind.fit(model, product, training, FitOptions(None, device, None, False))
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        merged = flow_kind.scorer(model, product)
        on = {"held": concat[0, torch.from_numpy(training.held if len(training.held) else training.fit)],
              "test": features(maps.test, flow, config, backbone.channels8),
              **{g: features(m, flow, config, backbone.channels8) for g, m in maps.gains.items()}}  # fmt: skip
        with torch.no_grad():
            patch = {key: merged(model.embed(c))[0].numpy() for key, c in on.items()}
        scores[product] = FlowScores(patch["held"], patch["test"], {g: patch[g] for g in maps.gains})
    return scores, graph_ms(merged, config.embed_dim, config.grid_size)


def graph_ms(merged: torch.nn.Module, dim: int, grid: int) -> float:
    """Median ms per image of the merged flow's ONNX graph: onnxruntime CPU, fp32, batch 1, 1 thread."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "flow.onnx"
        path.write_bytes(scorer_graph(merged, dim, grid).SerializeToString())
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: np.random.default_rng(0).standard_normal((1, dim, grid, grid), np.float32)}
    times = []
    for run in range(TIMING_RUNS + 20):
        started = time.perf_counter()
        session.run(None, feed)
        if run >= 20:  # warm-up
            times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def standardised(scores: FlowScores) -> FlowScores:
    """Scores in units of the flow's spread on held-out normal patches, around their mean."""
    mean, std = scores.held.mean(), scores.held.std()
    return FlowScores((scores.held - mean) / std, (scores.test - mean) / std,
                      {g: (s - mean) / std for g, s in scores.gains.items()})  # fmt: skip


def fuse(a: FlowScores, b: FlowScores, rule: str) -> FlowScores:
    """Two flows' standardised patch scores, combined patch by patch by their max or mean."""
    combine = np.maximum if rule == "max" else lambda x, y: (x + y) / 2
    a, b = standardised(a), standardised(b)
    gains = {g: combine(a.gains[g], b.gains[g]) for g in a.gains}
    return FlowScores(combine(a.held, b.held), combine(a.test, b.test), gains)


def top_k(patch: np.ndarray, k: int) -> np.ndarray:
    """The flow's image score: mean of the k highest patch scores, (N,H,W) -> (N,)."""
    return -np.sort(-patch.reshape(len(patch), -1), axis=1)[:, :k].mean(axis=1)


def flow_metrics(scores: FlowScores, split: Split, config: MoleFlowConfig) -> dict[str, float]:
    metrics = split_metrics(split, anomaly_maps(scores.test, config), top_k(scores.test, config.top_k))
    return {
        **dict(zip(METRICS, metrics, strict=True)),
        **exposure({g: top_k(s, config.top_k) for g, s in scores.gains.items()}),
    }


def reference_metrics(maps: ProductMaps, kernel: int, config: MoleFlowConfig) -> dict[str, dict[str, float]]:
    """kNN and Gaussian references on the features of one local-average kernel."""
    flow = Flow(kernel=kernel)
    train, test = features(maps.train[0], flow, config, 0), features(maps.test, flow, config, 0)
    results = {}
    for name, ref in (("knn", KnnReference(train)), ("gaussian", GaussianReference(train))):
        patch = ref.patch_scores(test)
        metrics = split_metrics(maps.split, anomaly_maps(patch, config), max_patch(patch))
        gains = {g: max_patch(ref.patch_scores(features(m, flow, config, 0))) for g, m in maps.gains.items()}
        results[name] = {**dict(zip(METRICS, metrics, strict=True)), **exposure(gains)}
    return results


def summary(rows: dict[str, dict[str, float]], counted: list[str]) -> dict[str, float]:
    gains = [rows[p][f"x{g}"] for p in counted for g in GAINS]
    return {
        **{k: float(np.mean([rows[p][k] for p in counted])) for k in METRICS},
        "exposure_mean": float(np.mean(gains)),
        "exposure_max": float(np.max(gains)),
    }


def run(root: Path, config: MoleFlowConfig, products: list[str], names: list[str]) -> dict:
    backbone = build_backbone(config, random_init=False).eval()
    print("backbone maps", flush=True)
    cache = {p: product_maps(backbone, root, p, config) for p in products}
    counted = [p for p in products if len(cache[p].train[0].stride8) >= SMOKE_IMAGES]
    per_product: dict[str, dict[str, dict[str, float]]] = {}
    for kernel in sorted({3, *(FLOWS[n].kernel for n in names)}, key=lambda k: (k != 3, k)):  # the default's first
        print(f"references, aggregation {kernel}", flush=True)
        for product, maps in cache.items():
            for ref, metrics in reference_metrics(maps, kernel, config).items():
                name = ref if kernel == 3 else f"{ref}, aggregation {kernel}"
                per_product.setdefault(name, {})[product] = metrics
    learned, ms = {}, {}
    for name in names:
        print(f"flow: {name}", flush=True)
        started = time.perf_counter()
        learned[name], ms[name] = learn(FLOWS[name], config, backbone, cache)
        print(f"  {time.perf_counter() - started:.0f} s, graph {ms[name]:.2f} ms", flush=True)
        per_product[name] = {p: flow_metrics(s, cache[p].split, config) for p, s in learned[name].items()}
    for fused, (a, b) in FUSED.items():
        if a in learned and b in learned:
            for rule in FUSIONS:
                name = f"{fused}, {rule}"
                ms[name] = ms[a] + ms[b]
                per_product[name] = {p: flow_metrics(fuse(learned[a][p], learned[b][p], rule), cache[p].split, config)
                                     for p in products}  # fmt: skip
    return {
        "data": str(root),
        "mean_over": counted,
        "graph_ms": ms,
        "products": per_product,
        "mean": {name: summary(rows, counted) for name, rows in per_product.items()},
    }


def markdown(result: dict) -> str:
    knn = result["mean"]["knn"]
    lines = [
        "| detector | image AUROC | pixel AUROC | pixel AP | AUPRO | exposure mean / worst | pixel AP / kNN's | "
        "image AUROC - kNN's | flow graph ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in result["mean"].items():
        cells = " | ".join(f"{m[k]:.3f}" for k in METRICS)
        ms = f"{result['graph_ms'][name]:.2f}" if name in result["graph_ms"] else "-"
        lines.append(
            f"| {name} | {cells} | {m['exposure_mean']:.3f} / {m['exposure_max']:.3f} | "
            f"{m['pixel_ap'] / knn['pixel_ap']:.2f} | {m['image_auroc'] - knn['image_auroc']:+.3f} | {ms} |"
        )
    per = ["", "| detector | " + " | ".join(result["products"]["knn"]) + " |",
           "|---|" + "---:|" * len(result["products"]["knn"])]  # fmt: skip
    for name, rows in result["products"].items():
        cells = " | ".join(f"{r['image_auroc']:.3f} / {r['pixel_ap']:.3f}" for r in rows.values())
        per.append(f"| {name} | {cells} |")
    counted = ", ".join(result["mean_over"])
    return "\n".join(lines + per) + f"\n\nmeans over {counted}; per product: image AUROC / pixel AP\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="MVTec-layout root: every category is learned")
    parser.add_argument("--config", type=Path, help="MoleFlowConfig JSON (default: the default config)")
    parser.add_argument("--products", help="comma-separated subset, in learning order (default: all, sorted)")
    parser.add_argument("--flows", help=f"comma-separated subset of: {', '.join(FLOWS)} (default: all)")
    parser.add_argument("--out", type=Path, default=Path("runs/levers"), help="folder for levers.json and levers.md")
    args = parser.parse_args()
    config = MoleFlowConfig.from_json(args.config) if args.config else MoleFlowConfig()
    products = args.products.split(",") if args.products else list_categories(args.data)
    names = args.flows.split(",") if args.flows else list(FLOWS)
    unknown = sorted(set(names) - set(FLOWS))
    if unknown:
        raise SystemExit(f"unknown flows {unknown}; known: {', '.join(FLOWS)}")
    started = time.perf_counter()
    result = run(args.data, config, products, names)
    result["seconds"] = time.perf_counter() - started
    write_results(args.out, "levers", result, markdown(result))


if __name__ == "__main__":
    main()
