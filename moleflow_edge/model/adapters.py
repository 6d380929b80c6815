"""Per-task feature adapters in front of the flow: whitening adapter and spatial-mixer gate."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

WA_GAMMA_INIT = -0.7  # g_raw at task 0: gamma = 0.5 + 1.5 sigmoid(-0.7), about 1


class WhiteningAdapter(nn.Module):
    """Affine-free LayerNorm over channels per patch, then gamma_t x + beta_t.

    gamma in [0.5, 2] and beta in [-2, 2] by construction, so no task can collapse or blow up
    the features it hands to the shared flow. Per-patch: a result never depends on the batch.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.g_raw = nn.Parameter(torch.full((dim,), WA_GAMMA_INIT))
        self.b_raw = nn.Parameter(torch.zeros(dim))

    def gamma_beta(self) -> tuple[torch.Tensor, torch.Tensor]:
        return 0.5 + 1.5 * torch.sigmoid(self.g_raw), 2.0 * torch.tanh(self.b_raw)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,D,H,W) -> whitened map and its log|det| per patch (sum log gamma), (B,H,W)."""
        gamma, beta = self.gamma_beta()
        normed = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], eps=1e-5).permute(0, 3, 1, 2)
        out = normed * gamma[:, None, None] + beta[:, None, None]
        log_det = gamma.log().sum().expand(x.shape[0], x.shape[2], x.shape[3])
        return out, log_det


class SpatialContextMixer(nn.Module):
    """F3 = (1 - a) F2 + a DWConv3x3(F2), a = sigmoid(theta_t): a shared conv, a per-task gate."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        nn.init.constant_(self.conv.weight, 1.0 / 9.0)  # starts as a local mean: neighbourhood context
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        a = torch.sigmoid(theta)
        return (1 - a) * x + a * self.conv(x)
