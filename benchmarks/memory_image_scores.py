"""Image-score variants of a trained memory model, beside the deployed one (issue 31, item 4).

The deployed memory kind scores an image by its largest patch distance (PatchCore's). This bench
scores every test image of each product under its own task (no routing, so only the image score
differs between the columns) and prints the image AUROC of the deployed score next to:

- ``topK``: the mean of the K largest patch distances;
- ``reweightB``: PatchCore's reweighting, the largest patch distance times
  1 - exp(d(m, m*)) / sum over m* and its B nearest bank vectors n of exp(d(m, n)), where m is the
  image's most distant patch and m* its nearest bank vector (an m* in a sparse part of the bank
  lowers the weight less).

Patch distances are computed once per product (exact search over the task's bank); pixel metrics do
not depend on the image score and are not repeated here.

    python benchmarks/memory_image_scores.py --data ../shared/data/real-dev --model runs/acc/model-memory
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from moleflow_edge.data.mvtec import load_split
from moleflow_edge.detectors.memory.kind import patch_vectors
from moleflow_edge.features import extract_features
from moleflow_edge.model_store import ModelStore

TOP_K = (3, 5, 10)
NEIGHBOURS = (3, 9)  # PatchCore's b; anomalib uses 9
SMOKE_IMAGES = 10  # products with fewer training images are left out of the mean, as in accuracy_bench


def reweighted(top: np.ndarray, patch: torch.Tensor, bank: torch.Tensor, nearest: torch.Tensor, b: int) -> np.ndarray:
    """PatchCore's image score for each image from its most distant patch ``patch`` (N,D), whose
    nearest bank rows are ``nearest`` (N,), and its largest distance ``top`` (N,)."""
    weights = []
    for vector, star in zip(patch, nearest.tolist(), strict=True):
        around = torch.cdist(bank[star][None], bank)[0].topk(b + 1, largest=False).indices  # m* first
        distance = torch.cdist(vector[None], bank[around])[0]
        weights.append(float(1 - torch.exp(distance[0]) / torch.exp(distance).sum()))
    return top * np.asarray(weights)


@torch.no_grad()
def product_scores(root: Path, model: torch.nn.Module, product: str) -> dict[str, float]:
    split = load_split(root, product, "test", model.config.image_size)
    vectors = patch_vectors(model, extract_features(model, split.images).concat)
    bank = model.per_task[product].bank.float()
    found = [torch.cdist(v, bank).min(dim=1) for v in vectors.split(4096)]
    distance, index = torch.cat([f.values for f in found]), torch.cat([f.indices for f in found])
    count = len(split.images)
    per_image = distance.reshape(count, -1)
    labels = (np.asarray(split.labels) != 0).astype(int)
    top = per_image.max(dim=1)
    scores = {"max (deployed)": top.values.numpy()}
    for k in TOP_K:
        scores[f"top{k}"] = per_image.topk(k, dim=1).values.mean(dim=1).numpy()
    rows = torch.arange(count) * per_image.shape[1] + top.indices
    for b in NEIGHBOURS:
        scores[f"reweight{b}"] = reweighted(top.values.numpy(), vectors[rows], bank, index[rows], b)
    return {name: float(roc_auc_score(labels, s)) for name, s in scores.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="MVTec-layout root the model was trained on")
    parser.add_argument("--model", type=Path, required=True, help="a model directory of memory tasks")
    args = parser.parse_args()
    store = ModelStore(args.model)
    model, _ = store.load()
    model.eval()
    rows = {}
    for product in store.tasks():
        if len(list((args.data / product / "train" / "good").iterdir())) < SMOKE_IMAGES:
            continue
        rows[product] = product_scores(args.data, model, product)
    names = list(next(iter(rows.values())))
    print("| product | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for product, row in [*rows.items(), ("mean", {n: float(np.mean([r[n] for r in rows.values()])) for n in names})]:
        print(f"| {product} | " + " | ".join(f"{row[n]:.4f}" for n in names) + " |")


if __name__ == "__main__":
    main()
