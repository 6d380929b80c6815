"""Frozen-backbone features of an image set, computed once and reused for every epoch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moleflow_edge.model.embedding import patch_concat
from moleflow_edge.model.mole_flow import MoleFlow

FEATURE_BATCH = 16


@dataclass(frozen=True)
class ImageFeatures:
    """concat: (N,Ccat,H,W) patch maps fed to the embedding; routing: (N,C) pooled router features."""

    concat: torch.Tensor
    routing: np.ndarray


@torch.no_grad()
def extract_features(model: MoleFlow, images_bgr: np.ndarray) -> ImageFeatures:
    """Run the backbone once over (N,S,S,3) uint8 BGR images, in batches."""
    concat, routing = [], []
    for start in range(0, len(images_bgr), FEATURE_BATCH):
        batch = torch.from_numpy(np.ascontiguousarray(images_bgr[start : start + FEATURE_BATCH]))
        maps = model.backbone_maps(batch)
        concat.append(patch_concat(maps))
        routing.append(model.routing_feature(maps).double().numpy())
    return ImageFeatures(torch.cat(concat), np.concatenate(routing))
