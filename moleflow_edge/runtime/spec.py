"""What the Runtime needs to route and score, whoever made the graphs.

An export's manifest gives it (``RuntimeSpec.of_export``) and so does a trained model directory
(``ModelStore.spec``), so the one routed-inference control flow (runtime.Runtime) serves the
deployed graphs and, over the torch backend (moleflow_edge/torch_backend.py), eval and the eager bench.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moleflow_edge.contract import Manifest, TaskEntry, find_task
from moleflow_edge.router import RouterTable
from moleflow_edge.runtime.router_file import load_router_table


@dataclass(frozen=True)
class RuntimeSpec:
    """Tasks in learning order (name, detector kind, thresholds per precision), the input size,
    the anomaly map's smoothing and the router over those tasks."""

    tasks: tuple[TaskEntry, ...]
    image_size: int
    map_sigma: float
    router: RouterTable

    @classmethod
    def of_export(cls, root: Path, manifest: Manifest) -> RuntimeSpec:
        """The spec of a checked export: its manifest and its router file."""
        return cls(tuple(manifest.tasks), manifest.image_size, manifest.map_sigma, load_router_table(root, manifest))

    @property
    def task_names(self) -> list[str]:
        return [entry.name for entry in self.tasks]

    def task(self, name: str) -> TaskEntry:
        return find_task(self.tasks, name, "known here")

    def first(self, known: int) -> RuntimeSpec:
        """The spec as it was right after the ``known``-th task was learned: the model is strictly
        additive, so that is these tasks and the router over them alone (what eval's forgetting compares)."""
        if not 1 <= known <= len(self.tasks):
            raise ValueError(f"known must be 1..{len(self.tasks)}, got {known}")
        return RuntimeSpec(self.tasks[:known], self.image_size, self.map_sigma, self.router.first(known))
