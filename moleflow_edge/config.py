"""One config object for every size and constant of MoLE-Flow.

The defaults mirror the papers (names in comments); tests build tiny models by
overriding fields. The config is saved as JSON in the model directory, so a
model is always rebuilt with the sizes it was trained with. Torch-free.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from enum import Enum
from pathlib import Path
from typing import get_args, get_type_hints


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


@dataclass(frozen=True)
class Span:
    """The values a numeric config field may take beyond its type: from ``low`` to ``high``, either end open."""

    low: float = -math.inf
    high: float = math.inf
    open_low: bool = False
    open_high: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.open_low else value >= self.low
        below = value < self.high if self.open_high else value <= self.high
        return above and below

    def __str__(self) -> str:
        if math.isinf(self.high):
            return f"{'>' if self.open_low else '>='} {self.low:g}"
        return f"in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}{')' if self.open_high else ']'}"


COUNT, AT_LEAST_0, POSITIVE = Span(1), Span(0), Span(0, open_low=True)
FRACTION = Span(0, 1, open_low=True)  # a ratio or quantile: more than none, at most all
# numeric fields and their spans; the types come from the field annotations (_type_problem)
SPANS: dict[str, Span] = {
    "image_size": Span(32), "embed_dim": COUNT, "num_mole_blocks": COUNT, "num_dia_blocks": AT_LEAST_0,
    "lora_rank": COUNT, "lora_alpha": POSITIVE, "hidden_ratio": POSITIVE, "clamp": POSITIVE,
    "scale_context_kernel": AT_LEAST_0, "coreset_ratio": FRACTION, "coreset_min": COUNT, "coreset_max": COUNT,
    "top_k": COUNT, "map_sigma": AT_LEAST_0, "lambda_tail": AT_LEAST_0, "tail_fraction": FRACTION,
    "lambda_logdet": AT_LEAST_0, "lr": POSITIVE, "weight_decay": AT_LEAST_0, "dia_lr_factor": AT_LEAST_0,
    "batch_size": COUNT, "max_steps": COUNT, "holdout_fraction": Span(0, 1, open_high=True), "eval_every": COUNT,
    "patience": COUNT, "feature_noise": AT_LEAST_0, "augment_copies": AT_LEAST_0,
    "augment_strength": Span(0, 1, open_high=True), "seed": AT_LEAST_0, "router_ridge": AT_LEAST_0,
    "router_limit_quantile": FRACTION, "router_limit_margin": POSITIVE,
    "memory_lists_from": COUNT, "memory_list_size": COUNT, "memory_probe": COUNT,
}  # fmt: skip


def _type_problem(value: object, kind: object) -> str | None:
    """What is wrong with ``value`` for a field annotated ``kind`` (None when nothing is): JSON gives
    strings, lists and 1.5 where an int is meant, and a bool is no number."""
    if isinstance(kind, type) and issubclass(kind, Enum):
        if isinstance(value, kind) or any(type(value) is type(m.value) and value == m.value for m in kind):
            return None
        return f"must be one of {', '.join(repr(m.value) for m in kind)}, got {value!r}"
    alternatives = get_args(kind) or (kind,)  # str | None: either
    if type(None) in alternatives and value is None:
        return None
    if bool in alternatives:
        return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
    if int in alternatives:
        return None if isinstance(value, int) and not isinstance(value, bool) else f"must be an integer, got {value!r}"
    if float in alternatives:
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return None if number else f"must be a finite number, got {value!r}"
    if str in alternatives:
        text = "a string or null" if type(None) in alternatives else "a string"
        return None if isinstance(value, str) else f"must be {text}, got {value!r}"
    raise TypeError(f"no check for config fields of type {kind}")  # a new field's type: add its check here


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
    coreset_ratio: float = 0.25  # memory detector: kept fraction of the training patches (greedy k-center; 1: all)
    coreset_min: int = 1000  # ... but at least this many (all of them if fewer): tiny products keep every patch
    coreset_max: int = 3000  # ... and at most this many: keeping all lost image AUROC and cost 9x (benchmarks/README)
    memory_lists_from: int = 25000  # banks of at least this many vectors are searched by inverted lists (cheaper)
    memory_list_size: int = 128  # ... of at most this many vectors each (k-means; a longer list is cut)
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
    router_limit_quantile: float = 0.99  # unknown-product limit (router.distance_limit): this quantile of
    router_limit_margin: float = 4.0  # held-out normal distances, JPEG round trips included, times this margin;
    # recorded in the export's manifest, so that calibrate sets limits by the same rule

    def __post_init__(self) -> None:
        """Every field checked against its annotation and span, with the field named: a config comes from JSON."""
        for f in fields(self):
            value, kind = getattr(self, f.name), _FIELD_TYPES[f.name]
            if problem := _type_problem(value, kind):
                raise ValueError(f"config field {f.name} {problem}")
            if isinstance(kind, type) and issubclass(kind, Enum):  # kept as members
                object.__setattr__(self, f.name, kind(value))
            if f.name in SPANS and value not in SPANS[f.name]:
                raise ValueError(f"config field {f.name} must be {SPANS[f.name]}, got {value!r}")
        if self.image_size % 16:
            raise ValueError(f"config field image_size must be a multiple of 16, got {self.image_size}")
        if self.coreset_min > self.coreset_max:
            raise ValueError(f"config fields coreset_min and coreset_max: {self.coreset_min} > {self.coreset_max}")
        if self.scale_context_kernel % 2 == 0 and self.scale_context_kernel:
            kernel = self.scale_context_kernel
            raise ValueError(f"config field scale_context_kernel must be 0 (none) or odd, got {kernel}")
        if self.embed_dim % 2:
            raise ValueError(f"config field embed_dim must be even (coupling splits it in two), got {self.embed_dim}")

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
        else the class default. ValueError, naming the file (and the field), for anything else."""
        try:
            given = json.loads(Path(path).read_text())
        except ValueError as exc:  # not JSON, or not UTF-8 text
            raise ValueError(f"{path}: not a JSON config file ({exc})") from None
        if not isinstance(given, dict):  # a user's file: ValueError, which the CLI reports in one line
            kind = type(given).__name__
            raise ValueError(f"{path}: a config file is a JSON object of fields, got a {kind}")  # noqa: TRY004
        data = {**(defaults or {}), **given}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown config fields {unknown}")
        try:
            return cls(**data)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None


_FIELD_TYPES = get_type_hints(MoleFlowConfig)  # the annotations, resolved: what __post_init__ checks against
