"""Frozen-backbone features of an image set, computed once and reused for every epoch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moleflow_edge.device import pinned
from moleflow_edge.model.mole_flow import MoleFlow

FEATURE_BATCH = 16


@dataclass(frozen=True)
class ImageFeatures:
    """concat: (N,Ccat,H,W) patch maps fed to the embedding; routing: (N,C) pooled router features."""

    concat: torch.Tensor
    routing: np.ndarray


@torch.no_grad()
def extract_features(model: MoleFlow, images_bgr: np.ndarray) -> ImageFeatures:
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
