"""One config object for every size and constant of MoLE-Flow.

The defaults mirror the papers (names in comments); tests build tiny models by
overriding fields. The config is saved as JSON in the model directory, so a
model is always rebuilt with the sizes it was trained with. Torch-free.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from enum import Enum
from pathlib import Path


class BackboneName(str, Enum):
    """Backbones with the uniform two-map interface (strides 8 and 16)."""

    EFFICIENTNET_LITE0 = "efficientnet_lite0"
    EFFICIENTNET_LITE1 = "efficientnet_lite1"
    EFFICIENTNET_LITE2 = "efficientnet_lite2"
    WIDE_RESNET50_2 = "wide_resnet50_2"


class PatchStride(int, Enum):
    """Patch grid: stride 16 (14x14 at 224 px, the papers') or stride 8 (28x28, finer maps)."""

    COARSE = 16
    FINE = 8


class AnomalyScore(str, Enum):
    """Patch score: the full -log p (nll), or its latent part 0.5 ||z||^2 alone (latent, as FastFlow).

    The log-det term rewards simple, low-texture patches whatever the product: a dark crack can
    get a higher likelihood than the normal surface around it.
    """

    NLL = "nll"
    LATENT = "latent"


class Whitening(str, Enum):
    """The per-task whitening adapter: per-patch LayerNorm (papers) or a fitted Mahalanobis whitener."""

    LAYERNORM = "layernorm"
    MAHALANOBIS = "mahalanobis"


class DetectorKind(str, Enum):
    """What scores a task's patches: MoLE-Flow (a normalizing flow with the task's LoRA adapters,
    the default) or a memory bank (PatchCore-style: a coreset of the task's training patches,
    nearest-neighbour distance). Both read the shared embedding and export the same graph shape."""

    FLOW = "flow"
    MEMORY = "memory"


class RouterPooling(str, Enum):
    """Which backbone map the router pools: stride 16 (free) or the last layer (papers)."""

    STRIDE16 = "stride16"
    LAST = "last"


class Covariance(str, Enum):
    """Router covariance estimate: Ledoit-Wolf shrinkage (default) or the papers' ridge."""

    LEDOIT_WOLF = "ledoit_wolf"
    RIDGE = "ridge"


# config fields that take one of a fixed set of values, and their Enum
_CHOICES: dict[str, type[Enum]] = {
    "backbone": BackboneName, "patch_stride": PatchStride, "whitening": Whitening, "detector": DetectorKind,
    "anomaly_score": AnomalyScore, "router_pooling": RouterPooling, "router_covariance": Covariance,
}  # fmt: skip


@dataclass(frozen=True)
class MoleFlowConfig:
    """Every size and constant of the model, the loss and the trainer."""

    backbone: BackboneName = BackboneName.EFFICIENTNET_LITE0
    backbone_weights: str | None = None  # local weight file; None = the backbone's offline default
    image_size: int = 224  # input size (224 in the papers)
    patch_stride: PatchStride = PatchStride.COARSE  # patch grid: 16 (papers) or 8 (4x finer maps)
    gain_normalise: bool = True  # divide out each frame's mean brightness inside the backbone graph
    embed_dim: int = 768  # D; capped at the backbone's channel count
    num_mole_blocks: int = 6  # M
    num_dia_blocks: int = 2  # N
    lora_rank: int = 64  # r
    lora_alpha: float = 64.0  # alpha (= r)
    hidden_ratio: float = 1.0  # subnet hidden width = hidden_ratio * D
    clamp: float = 1.9  # soft clamp c
    scale_context_kernel: int = 0  # embedder's depthwise scale-context kernel (papers' 5); 0 = none
    positional_encoding: bool = True  # add the fixed 2D sinusoidal encoding to the embedding
    spatial_context: bool = False  # spatial mixer and context-aware coupling scales (papers'; hurt with feature noise)
    whitening: Whitening = Whitening.MAHALANOBIS  # per-task whitening adapter: mahalanobis or layernorm (papers')
    detector: DetectorKind = DetectorKind.FLOW  # a new task's detector kind (train --detector overrides per task)
    coreset_ratio: float = 0.25  # memory detector: kept fraction of the training patches (greedy k-center)
    coreset_min: int = 1000  # ... but at least this many (all of them if fewer): tiny products keep every patch
    coreset_max: int = 3000  # ... and at most this many: its graph's cost grows linearly with the bank
    memory_lists_from: int = 25000  # memory banks of at least this many vectors are searched by inverted lists (below, exact is cheaper)
    memory_list_size: int = 64  # ... of about this many vectors each (k-means; a list longer than twice this is cut)
    memory_probe: int = 8  # ... of which each patch searches the lists whose centroids are nearest
    top_k: int = 3  # K for the image score
    anomaly_score: AnomalyScore = AnomalyScore.NLL  # nll (-log p, the papers') or latent (0.5 ||z||^2)
    map_sigma: float = 4.0  # Gaussian smoothing of the anomaly map, in pixels
    # loss
    lambda_tail: float = 0.0  # tail-aware loss weight (papers' 0.7)
    tail_fraction: float = 0.02  # top k% patches per image
    lambda_logdet: float = 1e-4  # log-det regularisation weight (0 switches it off)
    # optimiser
    lr: float = 1e-3  # papers' 3e-4
    weight_decay: float = 0.01
    dia_lr_factor: float = 0.5  # DIA parameters at half the learning rate
    batch_size: int = 16
    max_steps: int = 600  # optimiser steps per task at most; held-out stopping may stop sooner
    holdout_fraction: float = 0.2  # training images held out to decide when to stop (0: run max_steps)
    eval_every: int = 25  # steps between held-out checks
    patience: int = 4  # held-out checks without improvement before stopping; the best step is kept
    feature_noise: float = 0.15  # training noise on the embedding, in units of the task's patch spacing
    augment_copies: int = 4  # photometric variants per training image (gain, contrast, gamma)
    augment_strength: float = 0.2  # variants draw gain, contrast and gamma from [1 - s, 1 + s]
    augment_jpeg: bool = False  # detectors also learn JPEG round trips as normal (MJPEG cameras); the router always does
    seed: int = 0
    # router
    router_pooling: RouterPooling = RouterPooling.STRIDE16
    router_covariance: Covariance = Covariance.LEDOIT_WOLF
    router_ridge: float = 1e-5  # lambda_reg of the papers' ridge option
    router_limit_quantile: float = 0.99  # unknown-product limit: this quantile of
    router_limit_margin: float = 4.0  # 5-fold held-out training distances, times this margin

    def __post_init__(self) -> None:
        for name, choices in _CHOICES.items():  # JSON and the CLI give values: kept as members
            object.__setattr__(self, name, choices(getattr(self, name)))
        if self.image_size % 16 or self.image_size < 32:
            raise ValueError(f"image_size must be a multiple of 16 and >= 32, got {self.image_size}")
        if not 0.0 < self.coreset_ratio <= 1.0:
            raise ValueError(f"coreset_ratio must be in (0, 1], got {self.coreset_ratio}")
        if not 1 <= self.coreset_min <= self.coreset_max:
            raise ValueError(f"coreset sizes must be 1 <= coreset_min <= coreset_max, got {self.coreset_min}, {self.coreset_max}")
        for name in ("memory_lists_from", "memory_list_size", "memory_probe"):
            if getattr(self, name) < 1:
                raise ValueError(f"config field {name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in [0, 1), got {self.holdout_fraction}")
        for name in ("feature_noise", "augment_copies", "augment_strength"):
            if getattr(self, name) < 0:
                raise ValueError(f"config field {name} must be >= 0, got {getattr(self, name)}")
        for name in ("embed_dim", "num_mole_blocks", "lora_rank", "top_k", "batch_size", "max_steps", "eval_every", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"config field {name} must be >= 1, got {getattr(self, name)}")
        if self.scale_context_kernel < 0 or (self.scale_context_kernel and self.scale_context_kernel % 2 == 0):
            raise ValueError(f"scale_context_kernel must be 0 (none) or odd, got {self.scale_context_kernel}")
        if self.embed_dim % 2:
            raise ValueError(f"embed_dim must be even (coupling splits it in halves), got {self.embed_dim}")

    @property
    def grid_size(self) -> int:
        """Side of the patch grid."""
        return self.image_size // self.patch_stride

    def with_overrides(self, **overrides: object) -> MoleFlowConfig:
        """A copy with the given fields replaced (None values are ignored)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_json(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: Path, defaults: dict[str, object] | None = None) -> MoleFlowConfig:
        """The config of a JSON file; a field the file lacks takes ``defaults``' value if given there,
        else the class default."""
        data = {**(defaults or {}), **json.loads(Path(path).read_text())}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown config fields {unknown}")
        return cls(**data)
