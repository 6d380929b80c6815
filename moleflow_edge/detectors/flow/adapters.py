"""Per-task feature adapters in front of the flow: whitening adapter and spatial-mixer gate."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moleflow_edge.config import Whitening
from moleflow_edge.router import ledoit_wolf, mahalanobis_whitener

WA_GAMMA_INIT = -0.7  # g_raw at task 0: gamma = 0.5 + 1.5 sigmoid(-0.7), about 1


class WhiteningAdapter(nn.Module):
    """Per-task whitening, then gamma_t x + beta_t; gamma in [0.5, 2], beta in [-2, 2] by construction.

    ``layernorm`` (the papers'): affine-free LayerNorm over each patch's channels. It discards
    each patch's mean and scale, which is what locates a gain-normalised tyre's defects.
    ``mahalanobis``: W_t (x - mu_t) with mu_t and W_t (W^T W = inverse Ledoit-Wolf covariance)
    fitted once on the task's training patches, so an untrained flow already scores like the
    Gaussian reference. Both are per patch: a result never depends on the batch.
    """

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        self.mode = Whitening(mode)
        self.g_raw = nn.Parameter(torch.full((dim,), WA_GAMMA_INIT))
        self.b_raw = nn.Parameter(torch.zeros(dim))
        self.register_buffer("centre", torch.zeros(dim))
        self.register_buffer("whitener", torch.eye(dim))

    @torch.no_grad()
    def fit(self, embedded: torch.Tensor, noise: float = 0.0) -> None:
        """Mahalanobis mode: centre and whitener from a task's (N,D,H,W) training embeddings, for
        the density the flow learns: covariance + noise^2 I when training adds feature noise."""
        patches = embedded.permute(0, 2, 3, 1).reshape(-1, embedded.shape[1]).double().cpu().numpy()
        mean = patches.mean(axis=0)
        covariance = ledoit_wolf(patches - mean) + noise**2 * np.eye(len(mean))
        self.centre.copy_(torch.from_numpy(mean))
        self.whitener.copy_(torch.from_numpy(mahalanobis_whitener(covariance)))

    def gamma_beta(self) -> tuple[torch.Tensor, torch.Tensor]:
        return 0.5 + 1.5 * torch.sigmoid(self.g_raw), 2.0 * torch.tanh(self.b_raw)

    def constant_log_det(self) -> torch.Tensor:
        """log|det| of the whole adapter, the same for every patch, in float64: sum log gamma
        (+ log|det W| in Mahalanobis mode)."""
        gamma, _ = self.gamma_beta()
        log_det = gamma.double().log().sum()
        if self.mode is Whitening.MAHALANOBIS:
            log_det = log_det + torch.linalg.slogdet(self.whitener.double())[1]
        return log_det

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """(B,D,H,W) -> whitened (B,D,H,W), before gamma and beta."""
        if self.mode is Whitening.LAYERNORM:
            return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], eps=1e-5).permute(0, 3, 1, 2)
        return torch.einsum("dc,bchw->bdhw", self.whitener, x - self.centre[:, None, None])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,D,H,W) -> whitened map and its log|det| per patch, (B,H,W)."""
        gamma, beta = self.gamma_beta()
        out = self.normalise(x) * gamma[:, None, None] + beta[:, None, None]
        return out, self.constant_log_det().to(out.dtype).expand(x.shape[0], x.shape[2], x.shape[3])

    def merged(self) -> nn.Module:
        """The adapter as one constant op for export: a LayerNorm with scale/shift, or a 1x1 conv."""
        gamma, beta = (t.detach() for t in self.gamma_beta())
        if self.mode is Whitening.LAYERNORM:
            return ChannelLayerNorm(gamma, beta)
        conv = nn.Conv2d(len(gamma), len(gamma), 1)
        with torch.no_grad():
            conv.weight.copy_((gamma[:, None] * self.whitener)[:, :, None, None])
            conv.bias.copy_(beta - gamma * (self.whitener @ self.centre))
        return conv


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of each patch of a (B,D,H,W) map, with a constant scale/shift."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale.clone())
        self.register_buffer("shift", shift.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), self.scale.shape, self.scale, self.shift, 1e-5).permute(0, 3, 1, 2)


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
