"""Routed scores on the torch side, the way the deployed runtime forms them.

Route with the unknown-product limits, then run each task's scorer (its detector's PatchScorer:
a merged flow or a memory bank), the very module that export writes as that task's graph. Eval,
the eager bench and the parity tests all score through here, so the accuracy reported is the
deployed runtime's by construction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from moleflow_edge.detectors.registry import kind_of
from moleflow_edge.features import ImageFeatures
from moleflow_edge.model.continual_model import ContinualModel
from moleflow_edge.model.scorer import PatchScorer
from moleflow_edge.router import UNKNOWN, Prototype, RouterTable


class TaskDetectors:
    """Every task's scorer, whatever its detector kind, built on first use and kept for the model's lifetime."""

    def __init__(self, model: ContinualModel) -> None:
        self.model = model
        self._scorers: dict[str, PatchScorer] = {}

    def __getitem__(self, task: str) -> PatchScorer:
        if task not in self._scorers:
            scorer = kind_of(self.model.kind(task)).scorer(self.model, task)
            self._scorers[task] = scorer.to(self.model.embedder.position.device)
        return self._scorers[task]

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


def router_table(model: ContinualModel, prototypes: dict[str, Prototype]) -> RouterTable:
    """The router over every task of ``model`` in learning order, knowing each task's detector kind."""
    return RouterTable(model.tasks, [prototypes[t] for t in model.tasks], [model.kind(t).value for t in model.tasks])


@dataclass(frozen=True)
class Routing:
    """The router's decision for a batch, limits included (see ``route``)."""

    tasks: list[str]  # routed task per image, UNKNOWN beyond every limit
    nearest: list[str]  # the nearest task per image, limits aside: which product the router sees
    candidates: list[tuple[str, ...]]  # beyond every limit: tasks whose detectors may explain it; () otherwise
    distances: np.ndarray = field(compare=False)  # (N,T) to every prototype; candidates already depend on it


@dataclass(frozen=True)
class RoutedScores:
    """What the runtime decides for a batch: ``routing``, and scores.

    A frame of no known product is stopped by the line, so its image score is +inf; its patch
    scores come from the candidate task that explains it best (``RouterTable.explaining_task``), the
    map the runtime shows for it, so that pixel metrics stay defined for every image.
    """

    routing: Routing
    shown: list[str]  # the task whose detector gave each image's patch scores
    patch: np.ndarray  # (N,H,W)
    image: np.ndarray  # (N,)

    @property
    def tasks(self) -> list[str]:
        return self.routing.tasks

    @property
    def rejected(self) -> np.ndarray:
        """(N,) True where the frame was routed to no known product."""
        return np.array([t == UNKNOWN for t in self.tasks], dtype=bool)


def route(table: RouterTable, routing: np.ndarray, known: int | None = None) -> Routing:
    """Routing over the first ``known`` tasks (all by default: ``known`` rebuilds the router as it
    was right after an earlier task), from (N,C) pooled router features."""
    distances = table.distances(routing)
    tasks = table.route(distances, known)
    candidates = table.candidates(distances, known)
    return Routing(
        tasks,
        table.nearest(distances, known),
        [c if t == UNKNOWN else () for t, c in zip(tasks, candidates)],
        distances,
    )


@torch.no_grad()
def score_routed(
    detectors: TaskDetectors, table: RouterTable, features: ImageFeatures, known: int | None = None
) -> RoutedScores:
    """Route (limits included, see ``route``) and score every image under its task's detector; a
    frame beyond every limit under each of its candidates', keeping the one that explains it best."""
    routing = route(table, features.routing, known)
    embedded = detectors.model.embed(features.concat.to(detectors.model.embedder.position.device))
    shown = list(routing.tasks)
    routed = [i for i, t in enumerate(routing.tasks) if t != UNKNOWN]
    rejected = [i for i, t in enumerate(routing.tasks) if t == UNKNOWN]
    patch = np.zeros((len(shown), *embedded.shape[2:]), dtype=np.float32)
    image = np.full(len(shown), np.inf, dtype=np.float32)  # stopped frames stay +inf
    if routed:
        patch[routed], image[routed] = detectors.score(embedded[routed], [shown[i] for i in routed])
    if rejected:  # each candidate scores the stopped frames once; the best one's map is kept
        needed = dict.fromkeys(t for i in rejected for t in routing.candidates[i])
        by_task = {task: detectors.score(embedded[rejected], [task] * len(rejected))[0] for task in needed}
        for j, i in enumerate(rejected):
            candidates = routing.candidates[i]
            shown[i] = table.explaining_task(candidates, [by_task[t][j] for t in candidates], routing.distances[i])
            patch[i] = by_task[shown[i]][j]
    return RoutedScores(routing, shown, patch, image)
