"""patch_concat's local average: PatchCore's 3x3 by default, none at kernel 1, wider at 5."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moleflow_edge.backbones import BackboneMaps
from moleflow_edge.model.embedding import patch_concat

C8, C16, GRID = 2, 3, 8


def _spike_maps() -> BackboneMaps:
    """One unit spike per map, in the middle of the grid, every other value zero."""
    stride8, stride16 = torch.zeros(1, C8, 2 * GRID, 2 * GRID), torch.zeros(1, C16, GRID, GRID)
    stride8[..., GRID, GRID] = 1.0
    stride16[..., GRID // 2, GRID // 2] = 1.0
    return BackboneMaps(stride8, stride16, None)


def test_kernel_1_concatenates_the_maps_without_a_local_average() -> None:
    maps = _spike_maps()
    concat = patch_concat(maps, 16, kernel=1)
    assert torch.equal(concat[:, C8:], maps.stride16)
    assert torch.equal(concat[:, :C8], F.avg_pool2d(maps.stride8, 2, 2))


def test_the_default_is_the_3x3_average() -> None:
    maps = _spike_maps()
    assert torch.equal(patch_concat(maps, 16), patch_concat(maps, 16, kernel=3))
    part16 = patch_concat(maps, 16)[0, C8]
    assert torch.count_nonzero(part16) == 9
    assert torch.allclose(part16[part16 > 0], torch.tensor(1.0 / 9))


@pytest.mark.parametrize("kernel", [1, 3, 5])
def test_a_spike_spreads_over_kernel_squared_patches_and_keeps_its_mass(kernel: int) -> None:
    part16 = patch_concat(_spike_maps(), 16, kernel=kernel)[0, C8]
    assert torch.count_nonzero(part16) == kernel**2
    assert part16.sum().item() == pytest.approx(1.0)
