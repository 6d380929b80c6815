"""Which part of a same-feature reference carries its accuracy: metric, modes or position?

Scores every product of an MVTec-layout root with variants between the two references of
accuracy_bench.py (one Ledoit-Wolf Gaussian, kNN over every training patch), on the default
config's backbone features and grid, and prints image AUROC / pixel AUROC / pixel AP / AUPRO per
product and the means over products with at least SMOKE_IMAGES training images. No flow is
trained: this measures what a density score on these features can reach.

    python benchmarks/reference_variants.py --data ROOT [--backbone efficientnet_lite2]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from sklearn.cluster import KMeans

from moleflow_edge.backbones import build_backbone
from moleflow_edge.config import MoleFlowConfig
from moleflow_edge.data.mvtec import list_categories, load_split
from moleflow_edge.detectors.registry import build_model
from moleflow_edge.evaluate import anomaly_maps, split_metrics
from moleflow_edge.features import extract_features
from moleflow_edge.router import ledoit_wolf, mahalanobis_whitener

SMOKE_IMAGES = 10
CHUNK = 4096
Variant = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (train (N,H,W,C), test (M,H,W,C)) -> (M,H,W)


def nearest(queries: np.ndarray, bank: np.ndarray) -> np.ndarray:
    q, b = torch.from_numpy(queries), torch.from_numpy(bank)
    return torch.cat([torch.cdist(part, b).min(dim=1).values for part in q.split(CHUNK)]).numpy()


def gaussian(shrink: float = 0.0, position_prior: float | None = None) -> Variant:
    """Mahalanobis distance; covariance shrunk towards the scaled identity by ``shrink``; with
    ``position_prior`` a mean per grid position, shrunk to the global mean by that many images."""

    def score(train: np.ndarray, test: np.ndarray) -> np.ndarray:
        flat = train.reshape(-1, train.shape[-1])
        mean = flat.mean(axis=0)
        if position_prior is not None:
            mean = (len(train) * train.mean(axis=0) + position_prior * mean) / (len(train) + position_prior)
        residual = (train - mean).reshape(flat.shape)
        cov = ledoit_wolf(residual - residual.mean(axis=0))
        cov = (1 - shrink) * cov + shrink * np.trace(cov) / len(cov) * np.eye(len(cov))
        return np.sqrt((((test - mean) @ mahalanobis_whitener(cov).T) ** 2).sum(axis=-1))

    return score


def leading_directions(count: int) -> Variant:
    """Mahalanobis distance within the ``count`` leading principal directions only."""

    def score(train: np.ndarray, test: np.ndarray) -> np.ndarray:
        flat = train.reshape(-1, train.shape[-1])
        mean = flat.mean(axis=0)
        values, vectors = np.linalg.eigh(ledoit_wolf(flat - mean))
        keep = np.argsort(values)[::-1][:count]
        return np.sqrt(((((test - mean) @ vectors[:, keep]) / np.sqrt(values[keep])) ** 2).sum(axis=-1))

    return score


def nearest_centre(centres: int | None, whiten: bool) -> Variant:
    """Distance to the nearest of ``centres`` k-means centres (None: every training patch)."""

    def score(train: np.ndarray, test: np.ndarray) -> np.ndarray:
        flat = train.reshape(-1, train.shape[-1])
        mean = flat.mean(axis=0)
        w = mahalanobis_whitener(ledoit_wolf(flat - mean)).T if whiten else np.eye(flat.shape[1])
        bank, queries = (flat - mean) @ w, ((test - mean) @ w).reshape(-1, flat.shape[1])
        if centres is not None:
            bank = KMeans(centres, n_init=1, random_state=0).fit(bank).cluster_centers_
        return nearest(queries, bank).reshape(test.shape[:3])

    return score


def channels(variant: Variant, part: slice) -> Variant:
    """``variant`` on a slice of the channels: one backbone map's part of the patch vector."""
    return lambda train, test: variant(train[..., part], test[..., part])


def per_map_gaussians(channels8: int) -> Variant:
    """One Gaussian per backbone map, squared distances divided by each map's channel count and summed."""
    eight, sixteen = slice(None, channels8), slice(channels8, None)

    def score(train: np.ndarray, test: np.ndarray) -> np.ndarray:
        return sum(
            gaussian()(train[..., part], test[..., part]) ** 2 / train[..., part].shape[-1] for part in (eight, sixteen)
        )

    return score


def variants(channels8: int) -> dict[str, Variant]:
    """Every variant scored; ``channels8`` is where the stride-8 map's channels end in the patch vector."""
    return {
        "gaussian (reference)": gaussian(),
        "gaussian, mean per position": gaussian(position_prior=0.0),
        "gaussian, mean per position, prior 20": gaussian(position_prior=20.0),
        "nearest of 64 k-means centres, whitened": nearest_centre(64, whiten=True),
        "nearest of 256 k-means centres, whitened": nearest_centre(256, whiten=True),
        "nearest of 256 k-means centres, raw": nearest_centre(256, whiten=False),
        "knn, whitened": nearest_centre(None, whiten=True),
        "knn, raw (reference)": nearest_centre(None, whiten=False),
        "gaussian, covariance shrunk 0.5 to identity": gaussian(shrink=0.5),
        "gaussian, covariance shrunk 0.9 to identity": gaussian(shrink=0.9),
        "gaussian in the 32 leading principal directions": leading_directions(32),
        "gaussian in the 64 leading principal directions": leading_directions(64),
        "one gaussian per backbone map": per_map_gaussians(channels8),
        "knn, stride-8 map only": channels(nearest_centre(None, whiten=False), slice(None, channels8)),
        "knn, stride-16 map only": channels(nearest_centre(None, whiten=False), slice(channels8, None)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="MVTec-layout root")
    parser.add_argument("--backbone", default=MoleFlowConfig.backbone, help="backbone name (default: the default's)")
    args = parser.parse_args()
    config = MoleFlowConfig(backbone=args.backbone)
    backbone = build_backbone(config, random_init=False)
    model = build_model(config.with_overrides(embed_dim=backbone.channels8 + backbone.channels16), backbone).eval()
    scored = variants(backbone.channels8)
    rows: dict[str, dict[str, tuple[float, ...]]] = {}
    counted = []
    for product in list_categories(args.data):
        train_images = load_split(args.data, product, "train", config.image_size).images
        test = load_split(args.data, product, "test", config.image_size)
        train = extract_features(model, train_images).concat.permute(0, 2, 3, 1).double().numpy()
        queries = extract_features(model, test.images).concat.permute(0, 2, 3, 1).double().numpy()
        if len(train_images) >= SMOKE_IMAGES:
            counted.append(product)
        rows[product] = {}
        for name, variant in scored.items():
            patch = variant(train, queries).astype(np.float32)
            rows[product][name] = split_metrics(test, anomaly_maps(patch, config), patch.reshape(len(patch), -1).max(1))
            print(f"{product:14s} {name:44s} " + " / ".join(f"{v:.3f}" for v in rows[product][name]), flush=True)
    print(f"\nmeans over {', '.join(counted)} (image AUROC / pixel AUROC / pixel AP / AUPRO)")
    print("| detector | means |\n|---|---|")
    for name in scored:
        means = np.mean([rows[p][name] for p in counted], axis=0)
        print(f"| {name} | " + " / ".join(f"{v:.3f}" for v in means) + " |")


if __name__ == "__main__":
    main()
