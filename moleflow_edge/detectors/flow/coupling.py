"""Affine coupling blocks with the FrEIA contract: forward(x, rev=False) -> (y, log_det per patch).

The coupling math never knows what its subnet is: a LoRA subnet, a merged subnet and the
exported subnet are the same block with different weights. Every subnet takes the task whose
adapters to use (``None`` for a subnet without adapters), so no module holds "the active task".
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from moleflow_edge.detectors.flow.lora import LoRALinear


def soft_clamp(s: torch.Tensor, clamp: float) -> torch.Tensor:
    """s~ = c tanh(s / c): keeps exp(s~) bounded so training cannot blow up."""
    return clamp * torch.tanh(s / clamp)


class AffineCoupling(nn.Module):
    """y2 = x2 exp(s~(x1)) + t(x1) on (B,D,H,W); log|det J| = sum of s~ over channels, shape (B,H,W).

    ``swap`` picks which half conditions, so consecutive blocks alternate.
    """

    def __init__(self, subnet: nn.Module, clamp: float, swap: bool) -> None:
        super().__init__()
        self.subnet = subnet
        self.clamp = clamp
        self.swap = swap

    def forward(self, x: torch.Tensor, rev: bool = False, task: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        half = x.shape[1] // 2
        a, b = x[:, :half], x[:, half:]
        x1, x2 = (b, a) if self.swap else (a, b)
        s, t = self.subnet(x1, task)
        s = soft_clamp(s, self.clamp)
        y2 = (x2 - t) * torch.exp(-s) if rev else x2 * torch.exp(s) + t
        log_det = s.sum(dim=1)
        y = torch.cat([y2, x1] if self.swap else [x1, y2], dim=1)
        return y, (-log_det if rev else log_det)


class MoLESubnet(nn.Module):
    """Shared subnet with per-task LoRA: context-aware scale, context-free shift.

    ctx = sigmoid(theta_ctx) DWConv3x3(x1); s = L2s(ReLU(L1s([x1; ctx]))); t = L2t(ReLU(L1t(x1))).
    Without ``spatial_context`` the scale sees its own patch only: s = L2s(ReLU(L1s(x1))).
    """

    def __init__(self, half: int, hidden: int, rank: int, alpha: float, spatial_context: bool = True) -> None:
        super().__init__()
        self.context = nn.Conv2d(half, half, 3, padding=1, groups=half) if spatial_context else None
        self.context_gate = nn.Parameter(torch.zeros(())) if spatial_context else None  # theta_ctx, shared
        self.l1s = LoRALinear((2 if spatial_context else 1) * half, hidden, rank, alpha)
        self.l2s = LoRALinear(hidden, half, rank, alpha, zero_init=True)
        self.l1t = LoRALinear(half, hidden, rank, alpha)
        self.l2t = LoRALinear(hidden, half, rank, alpha, zero_init=True)

    def lora_layers(self) -> tuple[LoRALinear, ...]:
        return (self.l1s, self.l2s, self.l1t, self.l2t)

    def forward(self, x1: torch.Tensor, task: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.context is not None:
            x1_ctx = torch.cat([x1, torch.sigmoid(self.context_gate) * self.context(x1)], dim=1)
        else:
            x1_ctx = x1
        s = self.l2s(F.relu(self.l1s(x1_ctx, task)), task)
        t = self.l2t(F.relu(self.l1t(x1, task)), task)
        return s, t


class DIASubnet(nn.Module):
    """Per-task MLP on each patch (1x1 convs): D/2 -> hidden -> D, split into s and t."""

    def __init__(self, half: int, hidden: int) -> None:
        super().__init__()
        self.l1 = nn.Conv2d(half, hidden, 1)
        self.l2 = nn.Conv2d(hidden, 2 * half, 1)
        nn.init.xavier_uniform_(self.l1.weight)
        nn.init.zeros_(self.l1.bias)
        nn.init.zeros_(self.l2.weight)
        nn.init.zeros_(self.l2.bias)

    def forward(self, x1: torch.Tensor, task: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``task`` is unused: a DIA block belongs to one task already."""
        s, t = self.l2(F.relu(self.l1(x1))).chunk(2, dim=1)
        return s, t


def run_couplings(
    x: torch.Tensor, blocks: Iterable[AffineCoupling], task: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The one block loop of training, eval and export: x (B,D,H,W) through ``blocks`` under
    ``task``'s adapters -> (z, summed log|det J| (B,H,W))."""
    log_det = torch.zeros((), dtype=x.dtype, device=x.device)
    for block in blocks:
        x, block_log_det = block(x, task=task)
        log_det = log_det + block_log_det
    return x, log_det
