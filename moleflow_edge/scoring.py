"""Routed scores on the torch side, the way the deployed runtime forms them.

Route with the unknown-product limits, then run each task's merged flow: the very module that
export writes as that task's graph. Eval, the eager bench and the parity tests all score
through here, so the accuracy reported is the deployed runtime's by construction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from moleflow_edge.features import ImageFeatures
from moleflow_edge.model.merged import MergedFlow, merge_task
from moleflow_edge.model.mole_flow import MoleFlow
from moleflow_edge.router import UNKNOWN, RouterTable


class TaskFlows:
    """Every task's merged flow, built on first use and kept for the model's lifetime."""

    def __init__(self, model: MoleFlow) -> None:
        self.model = model
        self._merged: dict[str, MergedFlow] = {}

    def __getitem__(self, task: str) -> MergedFlow:
        if task not in self._merged:
            self._merged[task] = merge_task(self.model, task).to(self.model.embedder.position.device)
        return self._merged[task]

    @torch.no_grad()
    def score(self, embedded: torch.Tensor, assigned: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Patch scores (N,H,W) and image scores (N,), each embedding (N,D,H,W) under its assigned task."""
        patch = np.zeros((len(assigned), *embedded.shape[2:]), dtype=np.float32)
        image = np.zeros(len(assigned), dtype=np.float32)
        for task in dict.fromkeys(assigned):
            idx = [i for i, t in enumerate(assigned) if t == task]
            task_patch, task_image = self[task](embedded[idx])
            patch[idx], image[idx] = task_patch.float().cpu().numpy(), task_image.float().cpu().numpy()
        return patch, image


@dataclass(frozen=True)
class RoutedScores:
    """What the runtime decides for a batch: ``tasks`` (UNKNOWN beyond every limit), and scores.

    A frame of no known product is stopped by the line, so its image score is +inf; its patch
    scores come from the nearest task, so that pixel metrics stay defined for every image.
    """

    tasks: list[str]
    nearest: list[str]  # the nearest task per image, limits aside: which product the router sees
    patch: np.ndarray  # (N,H,W)
    image: np.ndarray  # (N,)

    @property
    def rejected(self) -> np.ndarray:
        """(N,) True where the frame was routed to no known product."""
        return np.array([t == UNKNOWN for t in self.tasks], dtype=bool)


def route(table: RouterTable, routing: np.ndarray, known: int | None = None) -> tuple[list[str], list[str]]:
    """(routed task per image, UNKNOWN beyond every limit; nearest task per image, limits aside) over
    the first ``known`` tasks (all by default: ``known`` rebuilds the router as it was right after an
    earlier task), from (N,C) pooled router features."""
    distances = table.distances(routing)
    return table.route(distances, known), table.nearest(distances, known)


@torch.no_grad()
def score_routed(
    flows: TaskFlows, table: RouterTable, features: ImageFeatures, known: int | None = None
) -> RoutedScores:
    """Route (limits included, see ``route``) and score every image under its task's flow."""
    tasks, nearest = route(table, features.routing, known)
    embedded = flows.model.embed(features.concat.to(flows.model.embedder.position.device))
    scores = RoutedScores(tasks, nearest, *flows.score(embedded, nearest))
    scores.image[scores.rejected] = np.inf
    return scores
