"""The trained model as a Runtime backend: eval, forgetting, the eager bench and gpu_check run the very
Runtime control flow the deployed graphs run (route with limits, one detector call per task group,
frames beyond every limit explained by their best candidate), over the torch modules that export
writes as graphs: the backbone and embedding, and each task's PatchScorer (a merged flow or a
memory bank).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from moleflow_edge.contract import Precision, TaskEntry
from moleflow_edge.detectors.registry import kind_of
from moleflow_edge.device import resolve_device
from moleflow_edge.features import extract_features
from moleflow_edge.model.continual_model import ContinualModel
from moleflow_edge.model.scorer import PatchScorer
from moleflow_edge.model_store import ModelStore
from moleflow_edge.router import Prototype
from moleflow_edge.runtime.backend import DetectorEngine, FeatureBatch, GraphBackend
from moleflow_edge.runtime.runtime import Runtime
from moleflow_edge.targets import Backend


class TorchDetector(DetectorEngine):
    """One task's PatchScorer: embedding rows on the model's device -> float32 scores on the host."""

    def __init__(self, task: str, scorer: PatchScorer) -> None:
        self.task, self.scorer = task, scorer
        self.estimated_bytes = sum(t.numel() * t.element_size() for t in (*scorer.parameters(), *scorer.buffers()))

    @torch.no_grad()
    def run(self, features: FeatureBatch, rows: list[int]) -> tuple[np.ndarray, np.ndarray]:
        patch, image = self.scorer(features.embedding[rows])  # type: ignore[index]
        return patch.float().cpu().numpy(), image.float().cpu().numpy()


class TorchBackend(GraphBackend):
    """The model's float32 modules on its device; routing in numpy on the host, as every CPU backend.
    Scorers are built once per task (a flow's adapters merged) and kept for the backend's lifetime,
    so that runtimes over the same model (eval's forgetting) share them."""

    kind = Backend.TORCH
    precision = Precision.FP32

    def __init__(self, model: ContinualModel, root: Path) -> None:
        self.model, self.root = model, root
        self.device = str(model.embedder.position.device)
        self._scorers: dict[str, TorchDetector] = {}

    @torch.no_grad()
    def backbone(self, images: np.ndarray) -> FeatureBatch:
        features = extract_features(self.model, images)
        embedding = self.model.embed(features.concat.to(self.model.embedder.position.device))
        return FeatureBatch(len(images), embedding, features.routing)

    def load_detector(self, entry: TaskEntry) -> DetectorEngine:
        if entry.name not in self._scorers:
            scorer = kind_of(entry.detector).scorer(self.model, entry.name)
            self._scorers[entry.name] = TorchDetector(entry.name, scorer.to(self.model.embedder.position.device))
        return self._scorers[entry.name]

    def estimate_bytes(self, entry: TaskEntry) -> int:
        return 0  # the model holds every task's weights already

    def close(self) -> None:
        self._scorers.clear()


def runtime_of(store: ModelStore, model: ContinualModel, prototypes: dict[str, Prototype]) -> Runtime:
    """A Runtime over a loaded model, on the model's device.

    Args:
        store: the model directory the model was loaded from (its spec: tasks, kinds, image size).
        model: the model as ``store.load`` returned it, on the device to run on.
        prototypes: the router prototypes ``store.load`` returned with it.

    Returns:
        A Runtime whose engines are the model's torch modules (``Runtime.over``).
    """
    return Runtime.over(store.spec(prototypes), TorchBackend(model, store.root))


def model_runtime(model_dir: str | Path, device: str | torch.device = "cpu") -> Runtime:
    """A Runtime over a trained model directory's every task, float32 on ``device``.

    Args:
        model_dir: a trained model directory.
        device: auto, cpu, cuda or cuda:N.

    Returns:
        A Runtime over the loaded model (``runtime_of``).
    """
    store = ModelStore(model_dir)
    model, prototypes = store.load()
    return runtime_of(store, model.to(resolve_device(device)), prototypes)
