"""The one shape every task's detector takes at inference, whatever its kind."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn


class PatchScorer(nn.Module, ABC):
    """embedding (B,D,H,W) -> patch_scores (B,H,W), image_score (B,): what eval scores through and
    export writes as the task's graph, so the accuracy measured is the deployed one."""

    @abstractmethod
    def forward(self, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...
