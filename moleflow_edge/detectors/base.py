"""The one interface every detector kind implements: its parts, their fit from a task's features,
and the scorer.

Training, eval, the eager bench, export and ``explaining_task`` only ever see this interface and
the PatchScorer module it returns, so a model may mix kinds in any order with no kind-specific
branch elsewhere.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from moleflow_edge.config import DetectorKind, MoleFlowConfig
from moleflow_edge.model.continual_model import ContinualModel
from moleflow_edge.model.scorer import PatchScorer


@dataclass(frozen=True)
class TrainingSet:
    """One task's training features, computed once: ``concat`` (V,N,Ccat,G,G) patch maps of the
    images and of their variants (JPEG round trips, photometric; the originals first), and the
    (fit, held-out) image indices (held-out images decide when a flow stops and set every
    kind's normal scale)."""

    concat: torch.Tensor
    fit: np.ndarray
    held: np.ndarray


@dataclass(frozen=True)
class FitOptions:
    """How to run a fit: at most ``steps`` optimiser steps where a kind takes steps (None: its
    settings' own limit), where, and whether to show progress."""

    steps: int | None
    device: torch.device
    precision: torch.dtype | None  # autocast dtype on CUDA, None for float32
    progress: bool


@dataclass(frozen=True)
class TaskFit:
    """What fitting a task did, in terms every kind has, and the task's normal scale for comparing
    candidates of unknown frames."""

    summary: str  # one phrase for the user: what was learned and how
    patch_level: tuple[float, float]  # (median, robust spread) of held-out normal patch scores
    seconds: float
    metrics: Mapping[str, float] = field(default_factory=dict)  # the kind's own figures (a flow's steps, loss)


class Kind(ABC):
    """A detector kind: its shared parts, the parts of each of its tasks, how they are fitted, and
    the module that scores with them. Registered by a DetectorKind member (config.py)."""

    name: DetectorKind
    # whether an int8 export quantizes its graph's matrix products (a memory bank's nearest
    # distances are small differences of large products: int8 loses them, so it keeps fp32)
    quantizable: bool
    # whether its fit of a model's first task trains the shared parts too (then frozen for good);
    # a model's first task of any other kind has them trained first (train.fit_shared_parts)
    trains_shared_parts: bool = False

    def shared_parts(self, config: MoleFlowConfig) -> dict[str, nn.Module | None]:
        """Modules every model holds for this kind's tasks to share, by attribute name (none by default)."""
        return {}

    @abstractmethod
    def new_parts(self, model: ContinualModel, task: str) -> nn.Module:
        """``task``'s own parts at their start (before fitting), stored under ``per_task.<task>``."""

    @abstractmethod
    def fit(self, model: ContinualModel, task: str, training: TrainingSet, options: FitOptions) -> TaskFit:
        """Fit ``task``'s parts of ``model`` (already added, on ``options.device``) from its features."""

    @abstractmethod
    def scorer(self, model: ContinualModel, task: str) -> PatchScorer:
        """``task``'s scorer as a plain module with constants folded in: what eval runs and export writes."""
