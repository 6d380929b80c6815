"""From a kind's name to its implementation, and the model every kind's shared parts make up.

DetectorKind (config.py) is the registry, one line per kind: member ``X = "x"`` is implemented by
``KIND`` in ``moleflow_edge.detectors.x.kind``, imported on first use.
"""

from __future__ import annotations

from importlib import import_module

import numpy as np
import torch

from moleflow_edge.backbones import Backbone
from moleflow_edge.config import DetectorKind, MoleFlowConfig
from moleflow_edge.detectors.base import Kind
from moleflow_edge.model.continual_model import ContinualModel
from moleflow_edge.model.scorer import PatchScorer


def kind_of(kind: DetectorKind | str) -> Kind:
    """The implementation of ``kind``."""
    return import_module(f"moleflow_edge.detectors.{DetectorKind(kind).value}.kind").KIND


def build_model(config: MoleFlowConfig, backbone: Backbone) -> ContinualModel:
    """A model with no task yet: the backbone, the shared embedding and every kind's shared parts."""
    return ContinualModel(
        config, backbone, {n: m for k in DetectorKind for n, m in kind_of(k).shared_parts(config).items()}
    )


def scorer_of(model: ContinualModel, task: str) -> PatchScorer:
    """``task``'s scorer, whatever its kind."""
    return kind_of(model.kind(task)).scorer(model, task)


@torch.no_grad()
def score_images(model: ContinualModel, images_bgr: np.ndarray, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """For tests and checks: uint8 (B,S,S,3) images -> (patch scores (B,H,W), image scores (B,)) under ``task``'s scorer."""
    images = torch.from_numpy(np.ascontiguousarray(images_bgr))
    return scorer_of(model, task)(model.embed(model.patch_concat(model.backbone_maps(images))))
