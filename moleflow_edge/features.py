"""Frozen-backbone features of an image set, computed once and reused for every epoch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moleflow_edge.device import pinned
from moleflow_edge.model.continual_model import ContinualModel

FEATURE_BATCH = 16


@dataclass(frozen=True)
class ImageFeatures:
    """concat: (N,Ccat,H,W) patch maps fed to the embedding; routing: (N,C) pooled router features."""

    concat: torch.Tensor
    routing: np.ndarray


@torch.no_grad()
def extract_features(model: ContinualModel, images_bgr: np.ndarray) -> ImageFeatures:
    """Run the backbone once over (N,S,S,3) uint8 BGR images, in batches, on the model's device
    (under the caller's autocast, if any); features come back float32 whatever ran inside."""
    device = model.embedder.position.device
    concat, routing = [], []
    for start in range(0, len(images_bgr), FEATURE_BATCH):
        batch = pinned(torch.from_numpy(np.ascontiguousarray(images_bgr[start : start + FEATURE_BATCH])), device)
        maps = model.backbone_maps(batch)
        concat.append(model.patch_concat(maps).float())
        routing.append(model.routing_feature(maps).double().cpu().numpy())
    return ImageFeatures(torch.cat(concat), np.concatenate(routing))


SPACING_FOLDS = 5
SPACING_CHUNK = 4096


@torch.no_grad()
def patch_spacing(embedded: torch.Tensor) -> float:
    """Median distance from a patch to the nearest patch of the other images, (N,D,H,W) -> float.

    The unit of the training feature noise: how far apart normal patches of different images lie
    (a kernel density's natural bandwidth scale), measured with the images split into folds, so
    that a patch is never compared with its own image. One image: the patches' total spread.
    """
    patches = embedded.permute(0, 2, 3, 1).flatten(1, 2).float()  # (N, H*W, D)
    folds = min(SPACING_FOLDS, len(patches))
    if folds < 2:
        return float(patches.flatten(0, 1).std(dim=0).norm())
    fold_of = torch.arange(len(patches), device=patches.device) % folds
    nearest = []
    for fold in range(folds):
        bank = patches[fold_of != fold].flatten(0, 1)
        queries = patches[fold_of == fold].flatten(0, 1)
        nearest += [torch.cdist(part, bank).min(dim=1).values for part in queries.split(SPACING_CHUNK)]
    return float(torch.cat(nearest).median())
