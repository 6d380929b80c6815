"""MoLE-Flow: frozen backbone -> shared embedding -> per-task WA/SCM -> LoRA coupling flow -> DIA.

Shared parts live at top level; every per-task part sits under a ``per_task.<task>`` key, so
a task's weights can be saved, loaded and merged apart from everything shared.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator

import torch
from torch import nn

from moleflow_edge.backbones import Backbone, BackboneMaps
from moleflow_edge.config import AnomalyScore, DetectorKind, MoleFlowConfig, RouterPooling
from moleflow_edge.model.adapters import SpatialContextMixer, WhiteningAdapter
from moleflow_edge.model.coupling import AffineCoupling, DIASubnet, MoLESubnet, run_couplings
from moleflow_edge.model.embedding import FeatureEmbedder, patch_concat
from moleflow_edge.model.lora import LoRALinear
from moleflow_edge.model.memory_bank import MemoryBank

TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
PER_TASK = "per_task"


def check_task_name(task: str) -> str:
    """Task names become file names and weight keys: letters, digits, '_' and '-' only."""
    if not TASK_NAME.match(task):
        raise ValueError(f"task name {task!r} must be letters, digits, '_' or '-' (starting with a letter or digit)")
    return task


def task_of_key(key: str) -> str | None:
    """The task a weight key belongs to, or None for a shared weight."""
    parts = key.split(".")
    return parts[parts.index(PER_TASK) + 1] if PER_TASK in parts else None


class TaskParts(nn.Module):
    """Everything one task owns besides its LoRA adapters: WA, SCM gate, DIA blocks."""

    def __init__(
        self, dim: int, num_dia: int, clamp: float, first_swap: bool, whitening: str, spatial_context: bool
    ) -> None:
        super().__init__()
        half = dim // 2
        self.whitening = WhiteningAdapter(dim, whitening)
        # theta_t, a = sigmoid(theta_t) = 0.5 at start; no mixer without spatial context
        self.mixer_gate = nn.Parameter(torch.zeros(())) if spatial_context else None
        self.dia = nn.ModuleList(
            AffineCoupling(DIASubnet(half, half), clamp, swap=(i % 2 == 1) ^ first_swap) for i in range(num_dia)
        )


def nll_from_latent(z: torch.Tensor, log_det: torch.Tensor) -> torch.Tensor:
    """-log p per patch: 0.5 ||z||^2 + (D/2) log 2 pi - log|det J|; z (B,D,H,W) -> (B,H,W)."""
    dim = z.shape[1]
    return 0.5 * z.pow(2).sum(dim=1) + 0.5 * dim * math.log(2 * math.pi) - log_det


def score_patches(z: torch.Tensor, log_det: torch.Tensor, score: AnomalyScore) -> torch.Tensor:
    """The one definition of a patch's anomaly score, eager and exported alike: z (B,D,H,W) and
    log|det J| (B,H,W) -> (B,H,W), -log p for ``nll`` or 0.5 ||z||^2 for ``latent``."""
    if score is AnomalyScore.LATENT:
        return 0.5 * z.pow(2).sum(dim=1)
    return nll_from_latent(z, log_det)


def top_k_mean(patch_scores: torch.Tensor, k: int) -> torch.Tensor:
    """Image score: mean of the K highest patch scores, (B,H,W) -> (B,)."""
    return patch_scores.flatten(1).topk(k, dim=1).values.mean(dim=1)


class MoleFlow(nn.Module):
    """The whole model; ``config.embed_dim`` must already be capped to the backbone's channels.

    Each task's detector owns ``per_task.<task>``: a flow task its TaskParts (and LoRA adapters in
    every coupling subnet), a memory task its MemoryBank. The shared embedding serves both.
    """

    def __init__(self, config: MoleFlowConfig, backbone: Backbone) -> None:
        super().__init__()
        self.config = config
        self.backbone = backbone
        dim, half = config.embed_dim, config.embed_dim // 2
        hidden = max(2, round(config.hidden_ratio * dim))
        concat = backbone.channels8 + backbone.channels16
        self.embedder = FeatureEmbedder(
            concat, dim, config.grid_size, config.scale_context_kernel, config.positional_encoding
        )
        self.mixer = SpatialContextMixer(dim) if config.spatial_context else None
        self.mole_blocks = nn.ModuleList(
            AffineCoupling(
                MoLESubnet(half, hidden, config.lora_rank, config.lora_alpha, config.spatial_context),
                config.clamp,
                swap=i % 2 == 1,
            )
            for i in range(config.num_mole_blocks)
        )
        self.per_task = nn.ModuleDict()

    @property
    def tasks(self) -> list[str]:
        return list(self.per_task.keys())

    def lora_layers(self) -> Iterator[LoRALinear]:
        return (m for m in self.modules() if isinstance(m, LoRALinear))

    def add_task(self, task: str, kind: DetectorKind = DetectorKind.FLOW) -> None:
        """Create a task's own parts. Flow: LoRA (B = 0), WA (from the first flow task's learned
        values), gate, DIA. Memory: an empty bank, filled by the memory detector's fit."""
        check_task_name(task)
        if task in self.per_task:
            raise ValueError(f"task {task!r} already exists")
        cfg = self.config
        if DetectorKind(kind) is DetectorKind.MEMORY:
            self.per_task[task] = MemoryBank(cfg.embed_dim)
            return
        parts = TaskParts(
            cfg.embed_dim, cfg.num_dia_blocks, cfg.clamp, cfg.num_mole_blocks % 2 == 1, cfg.whitening,
            cfg.spatial_context,
        )  # fmt: skip
        flows = [t for t in self.tasks if self.kind(t) is DetectorKind.FLOW]
        if flows:
            parts.whitening.load_state_dict(self.flow_parts(flows[0]).whitening.state_dict())
        self.per_task[task] = parts
        for layer in self.lora_layers():
            layer.add_task(task)

    def remove_task(self, task: str) -> None:
        """Drop a task's own parts (and LoRA adapters); shared weights stay as they are."""
        del self.per_task[task]
        for layer in self.lora_layers():
            if task in layer.per_task:
                del layer.per_task[task]

    def kind(self, task: str) -> DetectorKind:
        """The detector kind of a task in the model."""
        if task not in self.per_task:
            raise KeyError(f"task {task!r} is not in the model (tasks: {self.tasks})")
        return DetectorKind.MEMORY if isinstance(self.per_task[task], MemoryBank) else DetectorKind.FLOW

    def flow_parts(self, task: str) -> TaskParts:
        """A flow task's own parts; a clear error for a memory task, which has none."""
        if self.kind(task) is not DetectorKind.FLOW:
            raise KeyError(f"task {task!r} is a {self.kind(task).value} task: it has no flow")
        parts = self.per_task[task]
        assert isinstance(parts, TaskParts)
        return parts

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

    # --- flow ---------------------------------------------------------------------------------
    def flow(self, embedded: torch.Tensor, task: str, noise: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,D,H,W) embedding -> latent z (B,D,H,W) and total log|det J| (B,H,W) under task's adapters.

        ``noise`` (training only) adds N(0, noise^2 I) to the embedding, before whitening: the
        flow learns the training patches' density smoothed by an isotropic kernel in feature
        space, so the thin directions that whitening would blow up stop carrying the score.
        """
        parts = self.flow_parts(task)
        if noise > 0:
            embedded = embedded + noise * torch.randn_like(embedded)
        x, log_det = parts.whitening(embedded)
        if self.mixer is not None:
            x = self.mixer(x, parts.mixer_gate)
        z, flow_log_det = run_couplings(x, [*self.mole_blocks, *parts.dia], task)
        return z, log_det + flow_log_det

    def patch_scores(self, embedded: torch.Tensor, task: str) -> torch.Tensor:
        """Per-patch anomaly score (B,H,W) under task's adapters, as the config's anomaly_score says."""
        return score_patches(*self.flow(embedded, task), self.config.anomaly_score)

    def image_score(self, patch_scores: torch.Tensor) -> torch.Tensor:
        return top_k_mean(patch_scores, self.config.top_k)

    @torch.no_grad()
    def score_images(self, images_bgr: torch.Tensor, task: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Convenience for eval and parity checks: uint8 batch -> (patch scores (B,H,W), image scores (B,))."""
        patch = self.patch_scores(self.embed(self.patch_concat(self.backbone_maps(images_bgr))), task)
        return patch, self.image_score(patch)

    # --- parameter groups and state ---------------------------------------------------------------
    def shared_state_dict(self) -> dict[str, torch.Tensor]:
        """Trained shared weights (backbone excluded: it comes from its own weight file)."""
        return {
            k: v for k, v in self.state_dict().items() if task_of_key(k) is None and not k.startswith("backbone.")
        }

    def task_state_dict(self, task: str) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if task_of_key(k) == task}

    def shared_parameters(self) -> list[nn.Parameter]:
        return [
            p for k, p in self.named_parameters() if task_of_key(k) is None and not k.startswith("backbone.")
        ]

    def task_parameters(self, task: str) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(task's parameters outside DIA, its DIA parameters): DIA trains at a lower learning rate."""
        own = [(k, p) for k, p in self.named_parameters() if task_of_key(k) == task]
        dia_prefix = f"{PER_TASK}.{task}.dia."
        return [p for k, p in own if not k.startswith(dia_prefix)], [p for k, p in own if k.startswith(dia_prefix)]
