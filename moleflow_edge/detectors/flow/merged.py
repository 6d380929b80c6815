"""One task's merged flow: its adapters folded into constants, a plain flow at the base flow's cost.

The exported per-task graph must not pay for continual learning at inference: every LoRA
update is folded into its coupling linear (W = W_base + (alpha/r) B_t A_t, b = b_base + b_t),
the whitening adapter becomes one constant op (a LayerNorm or a 1x1 conv), the mixer gate one
depthwise conv, and every constant term of -log p a single offset.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from moleflow_edge.config import AnomalyScore
from moleflow_edge.detectors.flow.coupling import AffineCoupling, MoLESubnet, run_couplings
from moleflow_edge.detectors.flow.parts import flow_parts, score_patches, settings_of, top_k_mean
from moleflow_edge.model.continual_model import ContinualModel
from moleflow_edge.model.scorer import PatchScorer


class MergedFlow(PatchScorer):
    """One task's fused flow: embedding (B,D,H,W) -> patch_scores (B,H,W), image_score (B,).

    ``whitening`` is the whitening adapter folded into one constant op; its log-det does not
    depend on the input, so it is one constant, ``whitening_log_det``.
    """

    def __init__(
        self,
        whitening: nn.Module,
        mixer: nn.Module,
        blocks: list[AffineCoupling],
        whitening_log_det: float,
        top_k: int,
        score: AnomalyScore,
    ) -> None:
        super().__init__()
        self.whitening = whitening
        self.mixer = mixer
        self.blocks = nn.ModuleList(blocks)
        self.whitening_log_det = whitening_log_det
        self.top_k = top_k
        self.score = score

    def forward(self, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, log_det = run_couplings(self.mixer(self.whitening(embedding)), self.blocks)
        patch_scores = score_patches(x, log_det + self.whitening_log_det, self.score)
        return patch_scores, top_k_mean(patch_scores, self.top_k)


def merged_mixer(conv: nn.Conv2d, theta: torch.Tensor) -> nn.Conv2d:
    """(1 - a) x + a DWConv(x) as one depthwise conv: a W, plus (1 - a) on the centre tap, a b."""
    a = torch.sigmoid(theta.detach())
    fused = copy.deepcopy(conv)
    centre = conv.kernel_size[0] // 2, conv.kernel_size[1] // 2
    with torch.no_grad():
        fused.weight.mul_(a)
        fused.weight[:, :, centre[0], centre[1]] += 1 - a
        fused.bias.mul_(a)
    return fused


def merged_mole_subnet(subnet: MoLESubnet, task: str | None) -> MoLESubnet:
    """The same subnet class with ``task``'s LoRA folded into its base weights and no adapters."""
    fused = copy.deepcopy(subnet)
    with torch.no_grad():
        for src, dst in zip(subnet.lora_layers(), fused.lora_layers(), strict=True):
            weight, bias = src.merged(task)
            dst.weight.copy_(weight)
            dst.bias.copy_(bias)
            dst.per_task.clear()
    return fused


def merge_task(model: ContinualModel, task: str) -> MergedFlow:
    """Build ``task``'s fused flow from a loaded model; the model itself is left unchanged."""
    parts = flow_parts(model, task)
    blocks = [
        AffineCoupling(merged_mole_subnet(block.subnet, task), block.clamp, block.swap) for block in model.mole_blocks
    ]
    blocks += [copy.deepcopy(block) for block in parts.dia]
    merged = MergedFlow(
        parts.whitening.merged(),
        nn.Identity() if model.mixer is None else merged_mixer(model.mixer.conv, parts.mixer_gate),
        blocks,
        float(parts.whitening.constant_log_det().detach()),
        model.config.top_k,
        settings_of(model.config).anomaly_score,
    )
    merged.eval()
    for p in merged.parameters():
        p.requires_grad_(False)
    return merged
