"""The one interface every detector kind implements: fit from a task's features, and the scorer.

Training, eval, the eager bench, export and ``explaining_task`` only ever see this interface and
the PatchScorer module it returns, so a model may mix kinds in any order with no kind-specific
branch elsewhere.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

from moleflow_edge.config import DetectorKind
from moleflow_edge.model.mole_flow import MoleFlow
from moleflow_edge.model.scorer import PatchScorer


@dataclass(frozen=True)
class TrainingSet:
    """One task's training features, computed once: ``concat`` (V,N,Ccat,G,G) patch maps of the
    images and of their variants (JPEG round trips, photometric; the originals first), and the
    (fit, held-out) image indices (held-out images decide when a flow stops and set every
    detector's normal scale)."""

    concat: torch.Tensor
    fit: np.ndarray
    held: np.ndarray


@dataclass(frozen=True)
class FitOptions:
    """How to run a fit: at most ``max_steps`` optimiser steps (flows), where, and whether to show progress."""

    max_steps: int
    device: torch.device
    precision: torch.dtype | None  # autocast dtype on CUDA, None for float32
    progress: bool


@dataclass(frozen=True)
class DetectorFit:
    """What a fit did, and the task's normal scale for comparing candidates of unknown frames."""

    summary: str  # one phrase for the user: what was learned and how
    patch_level: tuple[float, float]  # (median, robust spread) of held-out normal patch scores
    seconds: float
    steps: int = 0  # optimiser steps run (flows; 0 for a memory bank)
    best_step: int = 0  # the step whose weights were kept
    final_loss: float = float("nan")  # held-out loss at best_step (flows)


class TaskDetector(ABC):
    """A detector kind: how a task's own parts (created by ``MoleFlow.add_task``) are fitted, and
    the module that scores with them."""

    kind: DetectorKind
    # whether an int8 export quantizes its graph's matrix products (a memory bank's nearest
    # distances are small differences of large products: int8 loses them, so it keeps fp32)
    quantizable: bool

    @abstractmethod
    def fit(self, model: MoleFlow, task: str, training: TrainingSet, options: FitOptions) -> DetectorFit:
        """Fit ``task``'s parts of ``model`` (already added, on ``options.device``) from its features."""

    @abstractmethod
    def scorer(self, model: MoleFlow, task: str) -> PatchScorer:
        """``task``'s scorer as a plain module with constants folded in: what eval runs and export writes."""
