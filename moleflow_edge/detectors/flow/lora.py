"""LoRALinear: a frozen shared 1x1 conv plus one low-rank adapter per task."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LoRAAdapter(nn.Module):
    """One task's low-rank update: (alpha/r) B A and a bias; B = 0 and bias = 0 at the start."""

    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.randn(rank, in_features) / math.sqrt(rank))  # A ~ N(0, 1/r)
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        self.bias = nn.Parameter(torch.zeros(out_features))


class LoRALinear(nn.Module):
    """h = W_base x + b_base + (alpha/r) B_t A_t x + b_t, applied per patch of a (B,C,H,W) map.

    The adapter is folded into the weight before the convolution: the same arithmetic as the
    exported merged graph, and cheaper than two extra products per patch.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, zero_init: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        if zero_init:
            nn.init.zeros_(self.weight)
        else:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.rank = rank
        self.scale = alpha / rank
        self.per_task = nn.ModuleDict()

    def add_task(self, task: str) -> None:
        self.per_task[task] = LoRAAdapter(self.weight.shape[1], self.weight.shape[0], self.rank)

    def merged(self, task: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, b) with task's adapter folded in; the base alone for task None."""
        if task is None:
            return self.weight, self.bias
        adapter = self.per_task[task]
        return self.weight + self.scale * adapter.B @ adapter.A, self.bias + adapter.bias

    def forward(self, x: torch.Tensor, task: str | None = None) -> torch.Tensor:
        """x (B,C,H,W) under ``task``'s adapter (None: the base alone, as in a merged subnet)."""
        weight, bias = self.merged(task)
        return F.conv2d(x, weight[:, :, None, None], bias)
