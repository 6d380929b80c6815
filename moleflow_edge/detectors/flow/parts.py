"""The flow kind's parts: MoLE-Flow's shared couplings (with a LoRA adapter per task), and a task's
own whitening adapter, mixer gate and DIA blocks; the flow itself and the patch score it gives.

Shared -> per task: shared embedding -> the task's WA (and, with spatial context, the shared
mixer under its gate) -> the shared MoLE couplings under its LoRA adapters -> its DIA blocks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn

from moleflow_edge.config import AnomalyScore, DetectorKind, MoleFlowConfig
from moleflow_edge.detectors.flow.adapters import SpatialContextMixer, WhiteningAdapter
from moleflow_edge.detectors.flow.coupling import AffineCoupling, DIASubnet, MoLESubnet, run_couplings
from moleflow_edge.detectors.flow.lora import LoRALinear
from moleflow_edge.detectors.flow.settings import FlowSettings
from moleflow_edge.model.continual_model import PER_TASK, ContinualModel


def settings_of(config: MoleFlowConfig) -> FlowSettings:
    """The flow section of ``config``."""
    return config.section(DetectorKind.FLOW)


class TaskParts(nn.Module):
    """Everything one flow task owns besides its LoRA adapters: WA, SCM gate, DIA blocks."""

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


def shared_parts(config: MoleFlowConfig) -> dict[str, nn.Module | None]:
    """The shared couplings every flow task runs under its own adapters, and the spatial mixer
    (None without spatial context); their names are their keys in a model's shared weights."""
    flow = settings_of(config)
    dim, half = config.embed_dim, config.embed_dim // 2
    hidden = max(2, round(flow.hidden_ratio * dim))
    return {
        "mixer": SpatialContextMixer(dim) if flow.spatial_context else None,
        "mole_blocks": nn.ModuleList(
            AffineCoupling(
                MoLESubnet(half, hidden, flow.lora_rank, flow.lora_alpha, flow.spatial_context),
                flow.clamp,
                swap=i % 2 == 1,
            )
            for i in range(flow.num_mole_blocks)
        ),
    }


def lora_layers(module: nn.Module) -> Iterator[LoRALinear]:
    return (m for m in module.modules() if isinstance(m, LoRALinear))


def new_task_parts(model: ContinualModel, task: str) -> TaskParts:
    """A flow task's own parts at their start: LoRA (B = 0) in every shared coupling, WA (from the
    first flow task's learned values), gate, DIA."""
    flow = settings_of(model.config)
    parts = TaskParts(
        model.config.embed_dim, flow.num_dia_blocks, flow.clamp, flow.num_mole_blocks % 2 == 1, flow.whitening,
        flow.spatial_context,
    )  # fmt: skip
    flows = [t for t in model.tasks if model.kind(t) is DetectorKind.FLOW]
    if flows:
        parts.whitening.load_state_dict(flow_parts(model, flows[0]).whitening.state_dict())
    for layer in lora_layers(model):
        layer.add_task(task)
    return parts


def flow_parts(model: ContinualModel, task: str) -> TaskParts:
    """A flow task's own parts; a clear error for a task of another kind, which has none."""
    if model.kind(task) is not DetectorKind.FLOW:
        raise KeyError(f"task {task!r} is a {model.kind(task).value} task, not a flow task")
    parts = model.per_task[task]
    assert isinstance(parts, TaskParts)
    return parts


def nll_from_latent(z: torch.Tensor, log_det: torch.Tensor) -> torch.Tensor:
    """-log p per patch: 0.5 ||z||^2 + (D/2) log 2 pi - log|det J|; z (B,D,H,W) -> (B,H,W)."""
    dim = z.shape[1]
    return 0.5 * z.pow(2).sum(dim=1) + 0.5 * dim * math.log(2 * math.pi) - log_det


def score_patches(z: torch.Tensor, log_det: torch.Tensor, score: AnomalyScore) -> torch.Tensor:
    """The one definition of a flow's patch anomaly score, eager and exported alike: z (B,D,H,W) and
    log|det J| (B,H,W) -> (B,H,W), -log p for ``nll`` or 0.5 ||z||^2 for ``latent``."""
    if score is AnomalyScore.LATENT:
        return 0.5 * z.pow(2).sum(dim=1)
    return nll_from_latent(z, log_det)


def top_k_mean(patch_scores: torch.Tensor, k: int) -> torch.Tensor:
    """Image score: mean of the K highest patch scores, (B,H,W) -> (B,)."""
    return patch_scores.flatten(1).topk(k, dim=1).values.mean(dim=1)


def flow(
    model: ContinualModel, embedded: torch.Tensor, task: str, noise: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,D,H,W) embedding -> latent z (B,D,H,W) and total log|det J| (B,H,W) under task's adapters.

    ``noise`` (training only) adds N(0, noise^2 I) to the embedding, before whitening: the
    flow learns the training patches' density smoothed by an isotropic kernel in feature
    space, so the thin directions that whitening would blow up stop carrying the score.
    """
    parts = flow_parts(model, task)
    if noise > 0:
        embedded = embedded + noise * torch.randn_like(embedded)
    x, log_det = parts.whitening(embedded)
    if model.mixer is not None:
        x = model.mixer(x, parts.mixer_gate)
    z, flow_log_det = run_couplings(x, [*model.mole_blocks, *parts.dia], task)
    return z, log_det + flow_log_det


def patch_scores(model: ContinualModel, embedded: torch.Tensor, task: str) -> torch.Tensor:
    """Per-patch anomaly score (B,H,W) under task's adapters, as the flow settings' anomaly_score says."""
    return score_patches(*flow(model, embedded, task), settings_of(model.config).anomaly_score)


def task_parameters(model: ContinualModel, task: str) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(task's parameters outside DIA, its DIA parameters): DIA trains at a lower learning rate."""
    own = model.task_named_parameters(task)
    dia_prefix = f"{PER_TASK}.{task}.dia."
    return [p for k, p in own if not k.startswith(dia_prefix)], [p for k, p in own if k.startswith(dia_prefix)]
