"""Backbone maps -> embedded patch features: PatchCore pooling, positional encoding, scale context."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moleflow_edge.backbones import BackboneMaps


def patch_concat(maps: BackboneMaps, stride: int, kernel: int = 3) -> torch.Tensor:
    """Parameter-free PatchCore step: kxk local average on both maps (PatchCore's 3; 1 = none),
    brought to one grid, concatenated.

    stride 16: the stride-8 map is pooled down, (B,C8,2H,2W),(B,C16,H,W) -> (B,C8+C16,H,W);
    stride 8: the stride-16 map is upsampled (bilinear), a 4x finer grid for small defects.
    """
    f8 = F.avg_pool2d(maps.stride8, kernel, 1, kernel // 2)
    f16 = F.avg_pool2d(maps.stride16, kernel, 1, kernel // 2)
    if stride == 16:
        f8 = F.avg_pool2d(f8, 2, 2)
    else:
        f16 = F.interpolate(f16, size=f8.shape[2:], mode="bilinear", align_corners=False)
    return torch.cat([f8, f16], dim=1)


def channel_pool_matrix(in_channels: int, out_channels: int) -> torch.Tensor:
    """(in, out) matrix equal to adaptive average pooling over channels, so that it exports as one MatMul."""
    matrix = torch.zeros(in_channels, out_channels)
    for j in range(out_channels):
        start = (j * in_channels) // out_channels
        end = math.ceil((j + 1) * in_channels / out_channels)
        matrix[start:end, j] = 1.0 / (end - start)
    return matrix


def sinusoidal_encoding(dim: int, height: int, width: int) -> torch.Tensor:
    """Fixed 2D sinusoidal encoding (dim,H,W): first half of channels encode rows, second half columns."""
    half = dim // 2
    quarter = half // 2
    freqs = torch.exp(torch.arange(quarter, dtype=torch.float64) * (-math.log(10000.0) / max(quarter, 1)))

    def encode(positions: int) -> torch.Tensor:
        angles = torch.arange(positions, dtype=torch.float64)[:, None] * freqs[None, :]
        enc = torch.cat([angles.sin(), angles.cos()], dim=1)  # (P, 2*quarter)
        return F.pad(enc, (0, half - enc.shape[1]))

    rows = encode(height).T[:, :, None].expand(half, height, width)
    cols = encode(width).T[:, None, :].expand(half, height, width)
    pe = torch.cat([rows, cols], dim=0)
    return F.pad(pe, (0, 0, 0, 0, 0, dim - pe.shape[0])).float()


class FeatureEmbedder(nn.Module):
    """Concatenated patch map (B,Ccat,H,W) -> embedding (B,D,H,W): F0 + positional encoding + scale context.

    Shared by all tasks; the scale context is trained with task 0 and then frozen. ``context_kernel``
    0 leaves it out: each patch is embedded from its own features alone.
    """

    def __init__(self, concat_channels: int, dim: int, grid: int, context_kernel: int, position: bool = True) -> None:
        super().__init__()
        self.register_buffer("pool", channel_pool_matrix(concat_channels, dim), persistent=False)
        encoding = sinusoidal_encoding(dim, grid, grid)[None]
        self.register_buffer("position", encoding if position else torch.zeros_like(encoding), persistent=False)
        self.context_proj = nn.Conv2d(concat_channels, dim, 1) if context_kernel else None
        self.context_dw = (
            nn.Conv2d(dim, dim, context_kernel, padding=context_kernel // 2, groups=dim) if context_kernel else None
        )
        if self.context_dw is not None:  # starts as F0 + PE; the context is learned from there
            nn.init.zeros_(self.context_dw.weight)
            nn.init.zeros_(self.context_dw.bias)

    def forward(self, concat: torch.Tensor) -> torch.Tensor:
        own = torch.einsum("bchw,cd->bdhw", concat, self.pool) + self.position  # F0 + PE
        if self.context_proj is None or self.context_dw is None:
            return own
        return own + self.context_dw(self.context_proj(concat))
