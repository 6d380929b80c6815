"""The continual model: frozen backbone -> shared embedding -> each task's own parts, of its kind.

Shared parts live at top level (the embedding, and the shared parts each detector kind asks for,
such as the flow's couplings); every per-task part sits under a ``per_task.<task>`` key, so a
task's weights can be saved, loaded and merged apart from everything shared. The container knows
each task's kind by name only: what the parts are and how they score is the kind's (detectors/).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Protocol

import torch
from torch import nn

from moleflow_edge.backbones import Backbone, BackboneMaps
from moleflow_edge.config import DetectorKind, MoleFlowConfig, RouterPooling
from moleflow_edge.errors import InputError
from moleflow_edge.model.embedding import FeatureEmbedder, patch_concat

TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
PER_TASK = "per_task"


class PartsMaker(Protocol):
    """What the model needs of a task's kind (detectors/base.py's Kind is one): its name, and the
    task's own parts. Declared here so that the model imports nothing of detectors/."""

    name: DetectorKind

    def new_parts(self, model: ContinualModel, task: str) -> nn.Module: ...


def check_task_name(task: str) -> str:
    """Task names become file names and weight keys: letters, digits, '_' and '-' only."""
    if not TASK_NAME.match(task):
        raise InputError(f"task name {task!r} must be letters, digits, '_' or '-' (starting with a letter or digit)")
    return task


def task_of_key(key: str) -> str | None:
    """The task a weight key belongs to, or None for a shared weight."""
    parts = key.split(".")
    return parts[parts.index(PER_TASK) + 1] if PER_TASK in parts else None


class ContinualModel(nn.Module):
    """The whole model; ``config.embed_dim`` must already be capped to the backbone's channels.

    ``shared``: every kind's shared modules by attribute name (detectors.registry.build_model
    collects them). Each task's kind owns ``per_task.<task>`` (and may keep more of the task's
    state in a ``per_task`` ModuleDict of a shared module, as the flow's LoRA layers do).
    """

    def __init__(self, config: MoleFlowConfig, backbone: Backbone, shared: Mapping[str, nn.Module | None]) -> None:
        super().__init__()
        self.config = config
        self.backbone = backbone
        concat = backbone.channels8 + backbone.channels16
        self.embedder = FeatureEmbedder(
            concat, config.embed_dim, config.grid_size, config.scale_context_kernel, config.positional_encoding
        )
        for name, module in shared.items():
            self.add_module(name, module)
        self.per_task = nn.ModuleDict()
        self._kinds: dict[str, DetectorKind] = {}

    @property
    def tasks(self) -> list[str]:
        return list(self.per_task.keys())

    def add_task(self, task: str, kind: PartsMaker) -> None:
        """Create a task's own parts, as ``kind`` makes them (empty or at their starting values; its fit fills them)."""
        check_task_name(task)
        if task in self.per_task:
            raise ValueError(f"task {task!r} already exists")
        self.per_task[task] = kind.new_parts(self, task)
        self._kinds[task] = kind.name

    def remove_task(self, task: str) -> None:
        """Drop a task's own parts, wherever a module keeps them by task; shared weights stay as they are."""
        for module in list(self.modules()):
            per_task = getattr(module, PER_TASK, None)
            if isinstance(per_task, nn.ModuleDict) and task in per_task:
                del per_task[task]
        del self._kinds[task]

    def kind(self, task: str) -> DetectorKind:
        """The detector kind of a task in the model."""
        if task not in self._kinds:
            raise KeyError(f"task {task!r} is not in the model (tasks: {self.tasks})")
        return self._kinds[task]

    # --- features -----------------------------------------------------------------------------
    def backbone_maps(self, images_bgr: torch.Tensor) -> BackboneMaps:
        """(B,S,S,3) uint8 BGR -> backbone maps (the last map only if the router pools it)."""
        return self.backbone(images_bgr, with_last=self.config.router_pooling is RouterPooling.LAST)

    def routing_feature(self, maps: BackboneMaps) -> torch.Tensor:
        """Global average pool of the router's map: (B,C)."""
        source = maps.last if self.config.router_pooling is RouterPooling.LAST else maps.stride16
        assert source is not None
        return source.mean(dim=(2, 3))

    def patch_concat(self, maps: BackboneMaps) -> torch.Tensor:
        """Backbone maps -> (B,Ccat,G,G) patch features on the config's grid."""
        return patch_concat(maps, self.config.patch_stride)

    def embed(self, concat: torch.Tensor) -> torch.Tensor:
        """(B,Ccat,H,W) patch concat -> (B,D,H,W) shared embedding."""
        return self.embedder(concat)

    # --- parameter groups and state ---------------------------------------------------------------
    def shared_state_dict(self) -> dict[str, torch.Tensor]:
        """Trained shared weights (backbone excluded: it comes from its own weight file)."""
        return {k: v for k, v in self.state_dict().items() if task_of_key(k) is None and not k.startswith("backbone.")}

    def task_state_dict(self, task: str) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if task_of_key(k) == task}

    def shared_parameters(self) -> list[nn.Parameter]:
        return [p for k, p in self.named_parameters() if task_of_key(k) is None and not k.startswith("backbone.")]

    def task_named_parameters(self, task: str) -> list[tuple[str, nn.Parameter]]:
        """Every parameter ``task`` owns, wherever it sits, with its key."""
        return [(k, p) for k, p in self.named_parameters() if task_of_key(k) == task]
