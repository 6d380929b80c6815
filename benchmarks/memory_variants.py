"""Which memory bank to deploy: coreset size, positional encoding and photometric variants, measured.

Fits the memory kind (moleflow_edge/detectors/memory/kind.py, the code train runs) on each product
of an MVTec-layout root alone, with the default config's backbone features, for each variant, and
scores the test split through the scorer export writes; the full-bank kNN reference of
accuracy_bench.py (every training patch, no coreset) is measured in the same run. Prints image
AUROC / pixel AP / worst exposure score (accuracy_bench's: AUROC of the good test images x0.9 and
x1.1 against x1.0) per product and the means over products with at least SMOKE_IMAGES training
images (worst: the largest), and the kept vectors per product. No routing: each product is scored
by its own bank.

    python benchmarks/memory_variants.py --data ROOT [--only 'TEXT|TEXT']
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from accuracy_bench import GAINS, exposure, with_gain

from moleflow_edge.augment import photometric_variants
from moleflow_edge.backbones import build_backbone
from moleflow_edge.config import DetectorKind, MoleFlowConfig
from moleflow_edge.data.mvtec import Split, list_categories, load_split
from moleflow_edge.detectors.base import FitOptions, TrainingSet
from moleflow_edge.detectors.memory.bank import MemoryScorer
from moleflow_edge.detectors.memory.coreset import coreset_size, greedy_coreset
from moleflow_edge.detectors.memory.kind import patch_vectors
from moleflow_edge.detectors.registry import build_model, kind_of
from moleflow_edge.evaluate import anomaly_maps, split_metrics
from moleflow_edge.features import extract_features
from moleflow_edge.model.continual_model import ContinualModel
from moleflow_edge.train import holdout_split

SMOKE_IMAGES = 10
Scorer = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # embedding -> patch (N,H,W), image (N,)
Variant = Callable[["Product"], tuple[Scorer, int]]  # -> the bank's scorer, its kept vectors


class Product:
    """One product's features, computed once: training patch maps (with photometric variants) and the test split."""

    def __init__(self, model: ContinualModel, root: Path, name: str) -> None:
        cfg = model.config
        train = load_split(root, name, "train", cfg.image_size).images
        copies = photometric_variants(train, cfg.augment_copies, cfg.augment_strength, cfg.seed)
        self.model, self.name, self.images = model, name, len(train)
        self.concat = torch.stack([extract_features(model, x).concat for x in [train, *copies]])
        self.test: Split = load_split(root, name, "test", cfg.image_size)
        self.test_embedded = model.embed(extract_features(model, self.test.images).concat)
        good = self.test.images[~self.test.labels.astype(bool)]
        self.good_at_gain = {g: model.embed(extract_features(model, with_gain(good, g)).concat) for g in (1.0, *GAINS)}


def deployed(variants: bool = True, **overrides: object) -> Variant:
    """The memory kind as train fits it, with config ``overrides``; without ``variants`` it
    banks the originals' patches alone (no photometric variants)."""

    def score(product: Product) -> tuple[Scorer, int]:
        model = product.model
        model.config = model.config.with_settings("memory", **overrides)
        concat = product.concat if variants else product.concat[:1]
        fit, held = holdout_split(concat.shape[1], model.config.holdout_fraction, model.config.seed)
        memory = kind_of(DetectorKind.MEMORY)
        model.add_task("variant", memory)
        memory.fit(model, "variant", TrainingSet(concat, fit, held), FitOptions(None, torch.device("cpu"), None, False))
        scorer = memory.scorer(model, "variant")
        kept = len(model.per_task["variant"].bank)
        model.remove_task("variant")
        return scorer, kept

    return score


def with_position(product: Product) -> tuple[Scorer, int]:
    """A coreset of a quarter of the originals' patches (1000 to 3000), over embeddings that keep the
    positional encoding, scored with it."""
    model, cfg = product.model, product.model.config
    embedded = model.embed(product.concat[0])
    vectors = embedded.permute(0, 2, 3, 1).reshape(-1, embedded.shape[1])
    count = coreset_size(len(vectors), 0.25, 1000, 3000)
    bank = vectors[greedy_coreset(vectors, count, cfg.seed)[0]]
    return MemoryScorer(bank, torch.zeros_like(model.embedder.position)), count


def over_every_candidate(count: int | None) -> Variant:
    """The bank before variant_cover: a greedy coreset of ``count`` over every candidate, originals and
    variants alike (None: every candidate, no search)."""

    def score(product: Product) -> tuple[Scorer, int]:
        model = product.model
        vectors = patch_vectors(model, product.concat.flatten(0, 1))
        kept = len(vectors) if count is None else min(count, len(vectors))
        bank = vectors if kept == len(vectors) else vectors[greedy_coreset(vectors, kept, model.config.seed)[0]]
        return MemoryScorer(bank, model.embedder.position), kept

    return score


def full_knn(product: Product) -> tuple[Scorer, int]:
    """accuracy_bench's kNN reference: every training patch of the originals, positional encoding out."""
    model = product.model
    vectors = (model.embed(product.concat[0]) - model.embedder.position).permute(0, 2, 3, 1)
    bank = vectors.reshape(-1, vectors.shape[-1])
    return MemoryScorer(bank, model.embedder.position), len(bank)


VARIANTS: dict[str, Variant] = {
    "knn, full bank (reference)": full_knn,
    "originals only, ratio 0.05, no min or max": deployed(False, coreset_ratio=0.05, coreset_min=1, coreset_max=10**6),
    "originals only, ratio 0.1, no min or max": deployed(False, coreset_ratio=0.1, coreset_min=1, coreset_max=10**6),
    "originals only, ratio 0.25, no min or max": deployed(False, coreset_ratio=0.25, coreset_min=1, coreset_max=10**6),
    "originals only, ratio 0.25, min 1000, max 3000": deployed(False, coreset_ratio=0.25, coreset_max=3000),
    "coreset of 3000 over originals and variants (the default before variant_cover)": over_every_candidate(3000),
    "coreset of 6000 over originals and variants": over_every_candidate(6000),
    "coreset of 12000 over originals and variants": over_every_candidate(12000),
    "every candidate, originals and variants": over_every_candidate(None),
    "default: every original patch and the 500 variant patches farthest from them": deployed(),
    "every original patch and the 2000 variant patches farthest from them": deployed(variant_cover=2000),
    "every original patch and the 8000 variant patches farthest from them": deployed(variant_cover=8000),
    "originals only, ratio 0.25, min 1000, max 3000, positional encoding kept": with_position,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument(
        "--only", default="", help="measure only the variants whose name holds one of these texts (|-separated)"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    config = MoleFlowConfig()
    backbone = build_backbone(config)
    model = build_model(
        config.with_overrides(embed_dim=min(config.embed_dim, backbone.channels8 + backbone.channels16)), backbone
    )
    model.eval()
    base_config = model.config
    products = [Product(model, args.data, name) for name in list_categories(args.data)]
    counted = [p.name for p in products if p.images >= SMOKE_IMAGES]
    print(f"means over {', '.join(counted)}; cells: image AUROC / pixel AP / worst exposure (kept vectors)")
    print("| variant | " + " | ".join(p.name for p in products) + " | mean |")
    print("|---|" + "---:|" * (len(products) + 1))
    with torch.no_grad():
        for name, variant in [(n, v) for n, v in VARIANTS.items() if any(part in n for part in args.only.split("|"))]:
            cells, means, worst = [], [], []
            for product in products:
                model.config = base_config
                scorer, kept = variant(product)
                patch, image = scorer(product.test_embedded)
                metrics = split_metrics(product.test, anomaly_maps(patch.numpy(), base_config), image.numpy())
                lighting = max(exposure({g: scorer(e)[1].numpy() for g, e in product.good_at_gain.items()}).values())
                cells.append(f"{metrics[0]:.3f} / {metrics[2]:.3f} / {lighting:.3f} ({kept})")
                if product.name in counted:
                    means.append((metrics[0], metrics[2]))
                    worst.append(lighting)
            mean = np.mean(means, axis=0)
            summary = f"**{mean[0]:.3f} / {mean[1]:.3f} / {max(worst):.3f}**"
            print(f"| {name} | " + " | ".join(cells) + f" | {summary} |", flush=True)


if __name__ == "__main__":
    main()
