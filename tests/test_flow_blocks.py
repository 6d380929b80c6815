"""The two tests that matter for flows, on every block kind: exact inverse and analytic log-det."""

from __future__ import annotations

import pytest
import torch

from moleflow_edge.detectors.flow.adapters import WhiteningAdapter
from moleflow_edge.detectors.flow.coupling import AffineCoupling, DIASubnet, MoLESubnet
from moleflow_edge.detectors.flow.lora import LoRALinear
from moleflow_edge.router import ledoit_wolf

DIM, GRID = 6, 3


def _randomise(module: torch.nn.Module) -> None:
    """Replace the zero-init output layers so the block is far from the identity."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def _mole_block(swap: bool) -> AffineCoupling:
    subnet = MoLESubnet(DIM // 2, 8, rank=2, alpha=2.0)
    for layer in subnet.lora_layers():
        layer.add_task("t")
    return AffineCoupling(subnet, clamp=1.9, swap=swap)


BLOCKS = {
    "mole": lambda: _mole_block(False),
    "mole-swapped": lambda: _mole_block(True),
    "dia": lambda: AffineCoupling(DIASubnet(DIM // 2, DIM // 2), clamp=1.9, swap=False),
    "dia-swapped": lambda: AffineCoupling(DIASubnet(DIM // 2, DIM // 2), clamp=1.9, swap=True),
}


@pytest.mark.parametrize("kind", sorted(BLOCKS))
def test_block_inverse_reconstructs_input(kind: str) -> None:
    block = BLOCKS[kind]().double()
    _randomise(block)
    x = torch.randn(2, DIM, GRID, GRID, dtype=torch.float64)
    y, log_det = block(x, task="t")
    x_back, inv_log_det = block(y, rev=True, task="t")
    assert not torch.allclose(y, x)  # a real transform, not the identity
    assert torch.allclose(x_back, x, atol=1e-5)
    assert torch.allclose(inv_log_det, -log_det, atol=1e-5)


def test_per_patch_block_log_det_matches_autograd_jacobian() -> None:
    """DIA acts per patch: its log-det per patch equals log|det| of that patch's DxD Jacobian."""
    block = BLOCKS["dia"]().double()
    _randomise(block)
    x = torch.randn(1, DIM, 1, 1, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: block(v.view(1, DIM, 1, 1), task="t")[0].view(DIM), x.view(DIM))
    _, log_det = block(x, task="t")
    assert torch.allclose(log_det.view(()), torch.linalg.slogdet(jac)[1], atol=1e-6)


@pytest.mark.parametrize("swap", [False, True])
def test_mole_block_log_det_matches_full_map_jacobian(swap: bool) -> None:
    """MoLE subnets see neighbours (3x3 context), so take the Jacobian of the whole map:
    it is triangular by halves, and its log|det| equals the sum of the per-patch log-dets."""
    block = _mole_block(swap).double()
    _randomise(block)
    shape = (1, DIM, GRID, GRID)
    n = DIM * GRID * GRID
    x = torch.randn(shape, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: block(v.view(shape), task="t")[0].reshape(n), x.reshape(n))
    _, log_det = block(x, task="t")
    assert torch.allclose(log_det.sum(), torch.linalg.slogdet(jac)[1], atol=1e-6)


def test_mahalanobis_whitening_log_det_matches_patch_jacobian_and_whitens_its_fit_data() -> None:
    wa = WhiteningAdapter(DIM, "mahalanobis").double()
    scales = torch.linspace(0.5, 4.0, DIM, dtype=torch.float64)[None, :, None, None]
    fit_data = torch.randn(40, DIM, GRID, GRID, dtype=torch.float64) * scales + 2.0
    wa.fit(fit_data)
    whitened = wa.normalise(fit_data).permute(0, 2, 3, 1).reshape(-1, DIM)
    assert whitened.mean(dim=0).abs().max() < 1e-6
    patches = fit_data.permute(0, 2, 3, 1).reshape(-1, DIM).numpy()
    covariance = torch.from_numpy(ledoit_wolf(patches - patches.mean(axis=0)))  # the estimate it whitens
    assert torch.allclose(wa.whitener @ covariance @ wa.whitener.T, torch.eye(DIM, dtype=torch.float64), atol=1e-8)
    _randomise(wa)
    patch = torch.randn(DIM, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: wa(v.view(1, DIM, 1, 1))[0].reshape(DIM), patch)
    _, log_det = wa(patch.view(1, DIM, 1, 1))
    assert torch.allclose(log_det.reshape(()), torch.linalg.slogdet(jac)[1], atol=1e-8)


def test_whitening_adapter_log_det_is_log_gamma_and_batch_independent() -> None:
    wa = WhiteningAdapter(DIM, "layernorm").double()
    _randomise(wa)
    x = torch.randn(3, DIM, GRID, GRID, dtype=torch.float64)
    out, log_det = wa(x)
    gamma, _ = wa.gamma_beta()
    assert torch.allclose(log_det, gamma.log().sum().expand(3, GRID, GRID))
    assert ((gamma >= 0.5) & (gamma <= 2.0)).all()
    single, _ = wa(x[1:2])
    assert torch.equal(single, out[1:2])  # a result never depends on the rest of the batch


def test_lora_linear_with_zero_b_outputs_exactly_its_base() -> None:
    layer = LoRALinear(5, 7, rank=3, alpha=3.0)
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(2, 5, 4, 4)
    base = layer(x)
    layer.add_task("new")
    assert torch.equal(layer(x, "new"), base)
    with torch.no_grad():
        layer.per_task["new"].B.normal_()
    assert not torch.equal(layer(x, "new"), base)  # and the adapter does act once B moves
    assert torch.equal(layer(x), base)  # while the base alone stays what it was


def test_mahalanobis_whitening_with_training_noise_whitens_the_smoothed_covariance() -> None:
    wa = WhiteningAdapter(DIM, "mahalanobis").double()
    scales = torch.linspace(0.1, 4.0, DIM, dtype=torch.float64)[None, :, None, None]
    fit_data = torch.randn(40, DIM, GRID, GRID, dtype=torch.float64) * scales
    wa.fit(fit_data, noise=0.5)
    patches = fit_data.permute(0, 2, 3, 1).reshape(-1, DIM).numpy()
    noise_floor = 0.25 * torch.eye(DIM, dtype=torch.float64)
    smoothed = torch.from_numpy(ledoit_wolf(patches - patches.mean(axis=0))) + noise_floor
    assert torch.allclose(wa.whitener @ smoothed @ wa.whitener.T, torch.eye(DIM, dtype=torch.float64), atol=1e-8)
    # the thinnest direction (std 0.1) is no longer blown up 10x: the noise floor caps its gain at 2
    assert torch.linalg.svdvals(wa.whitener).max() < 2.0
