"""One config object for every size and constant of MoLE-Flow.

The defaults mirror the papers (names in comments); tests build tiny models by
overriding fields. The config is saved as JSON in the model directory, so a
model is always rebuilt with the sizes it was trained with. Torch-free.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from enum import Enum
from importlib import import_module
from pathlib import Path
from typing import Any, get_args, get_type_hints


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
    nearest-neighbour distance). All read the shared embedding and export the same graph shape.

    This is the registry of kinds, one line each: a member's value names its package,
    ``moleflow_edge.detectors.<value>``, which holds its parts, fit, scorer and settings (the
    recipe for a new kind: docs/architecture.md).
    """

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
# numeric fields shared by every kind and their spans; the types come from the field annotations
# (_type_problem); each kind's settings class keeps the spans of its own fields
SPANS: dict[str, Span] = {
    "image_size": Span(32), "embed_dim": COUNT, "scale_context_kernel": AT_LEAST_0, "top_k": COUNT,
    "map_sigma": AT_LEAST_0, "holdout_fraction": Span(0, 1, open_high=True), "augment_copies": AT_LEAST_0,
    "augment_strength": Span(0, 1, open_high=True), "seed": AT_LEAST_0, "router_ridge": AT_LEAST_0,
    "router_limit_quantile": FRACTION, "router_limit_margin": POSITIVE,
}  # fmt: skip


def check_fields(settings: object, spans: dict[str, Span], where: str = "") -> None:
    """Every field of the dataclass ``settings`` checked against its annotation and span, with the field
    named (``where`` is its section, "" at the top): a config comes from JSON. Enum fields are kept as members."""
    hints = get_type_hints(type(settings))
    for f in fields(settings):  # type: ignore[arg-type]
        if f.name == "sections":
            continue
        value, kind, name = getattr(settings, f.name), hints[f.name], f"{where}.{f.name}" if where else f.name
        if problem := _type_problem(value, kind):
            raise ValueError(f"config field {name} {problem}")
        if isinstance(kind, type) and issubclass(kind, Enum):
            object.__setattr__(settings, f.name, kind(value))
        if f.name in spans and value not in spans[f.name]:
            raise ValueError(f"config field {name} must be {spans[f.name]}, got {value!r}")


def settings_class(kind: DetectorKind) -> type:
    """The settings dataclass of ``kind``: ``Settings`` in its package's settings.py (torch-free)."""
    return import_module(f"moleflow_edge.detectors.{kind.value}.settings").Settings


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
    """Every size and constant of the model and the trainer: the fields every kind shares, and one
    section of settings per detector kind (``sections``, by kind; ``section(kind)`` reads one)."""

    backbone: BackboneName = BackboneName.EFFICIENTNET_LITE0
    backbone_weights: str | None = None  # local weight file; None = the backbone's offline default
    image_size: int = 224  # input size (224 in the papers)
    patch_stride: PatchStride = PatchStride.COARSE  # patch grid: 16 (papers) or 8 (4x finer maps)
    gain_normalise: bool = True  # divide out each frame's mean brightness inside the backbone graph
    embed_dim: int = 768  # D; capped at the backbone's channel count
    scale_context_kernel: int = 0  # embedder's depthwise scale-context kernel (papers' 5); 0 = none
    positional_encoding: bool = True  # add the fixed 2D sinusoidal encoding to the embedding
    detector: DetectorKind = DetectorKind.FLOW  # a new task's detector kind (train --detector overrides per task)
    top_k: int = 3  # K for the image score
    map_sigma: float = 4.0  # Gaussian smoothing of the anomaly map, in pixels
    holdout_fraction: float = 0.2  # training images held out: a flow's stopping, every kind's normal scale
    augment_copies: int = 4  # photometric variants per training image (gain, contrast, gamma)
    augment_strength: float = 0.2  # variants draw gain, contrast and gamma from [1 - s, 1 + s]
    augment_jpeg: bool = (
        False  # detectors also learn JPEG round trips as normal (MJPEG cameras); the router always does
    )
    seed: int = 0
    # router
    router_pooling: RouterPooling = RouterPooling.STRIDE16
    router_covariance: Covariance = Covariance.LEDOIT_WOLF
    router_ridge: float = 1e-5  # lambda_reg of the papers' ridge option
    router_limit_quantile: float = 0.99  # unknown-product limit (router.distance_limit): this quantile of
    router_limit_margin: float = 4.0  # held-out normal distances, JPEG round trips included, times this margin;
    # recorded in the export's manifest, so that calibrate sets limits by the same rule
    # each kind's settings (its package's Settings class), every kind present; given as a settings
    # object or, from JSON, as a mapping of its fields
    sections: dict[DetectorKind, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Every field checked against its annotation and span, with the field named: a config comes from JSON."""
        check_fields(self, SPANS)
        if not isinstance(self.sections, dict):
            raise ValueError(f"config sections must be a mapping of kind to settings, got {self.sections!r}")  # noqa: TRY004
        sections: dict[DetectorKind, Any] = {}
        for kind in DetectorKind:
            given = self.sections.get(kind, self.sections.get(kind.value))
            cls = settings_class(kind)
            if given is None or isinstance(given, cls):
                sections[kind] = given or cls()
            elif isinstance(given, dict):
                unknown = sorted(set(given) - {f.name for f in fields(cls)})
                if unknown:
                    raise ValueError(f"unknown config fields {[f'{kind.value}.{n}' for n in unknown]}")
                sections[kind] = cls(**given)
            else:
                raise ValueError(f"config section {kind.value} must be an object of fields, got {given!r}")
        names = [k.value for k in DetectorKind]
        unknown = sorted(str(getattr(k, "value", k)) for k in self.sections if getattr(k, "value", k) not in names)
        if unknown:
            raise ValueError(f"config sections {unknown} name no detector kind (kinds: {names})")
        object.__setattr__(self, "sections", sections)
        if self.image_size % 16:
            raise ValueError(f"config field image_size must be a multiple of 16, got {self.image_size}")
        if self.scale_context_kernel % 2 == 0 and self.scale_context_kernel:
            kernel = self.scale_context_kernel
            raise ValueError(f"config field scale_context_kernel must be 0 (none) or odd, got {kernel}")
        if self.embed_dim % 2:
            raise ValueError(f"config field embed_dim must be even (coupling splits it in two), got {self.embed_dim}")

    @property
    def grid_size(self) -> int:
        """Side of the patch grid."""
        return self.image_size // self.patch_stride

    def section(self, kind: DetectorKind | str) -> Any:
        """The settings of ``kind`` (its package's Settings class)."""
        return self.sections[DetectorKind(kind)]

    def with_overrides(self, **overrides: object) -> MoleFlowConfig:
        """A copy with the given shared fields replaced (None values are ignored)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def with_settings(self, kind: DetectorKind | str, **overrides: object) -> MoleFlowConfig:
        """A copy with the given fields of ``kind``'s section replaced."""
        kind = DetectorKind(kind)
        return replace(self, sections={**self.sections, kind: replace(self.section(kind), **overrides)})

    def to_dict(self) -> dict[str, object]:
        """The JSON form: the shared fields, then one object per kind named by the kind."""
        shared = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "sections"}
        return {**shared, **{k.value: asdict(v) for k, v in self.sections.items()}}

    def to_json(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: Path, upgrade: Callable[[dict], dict] | None = None) -> MoleFlowConfig:
        """The config of a JSON file, read through ``upgrade`` where one is given (an older form read
        as this one: migrations/model_dir.py); a field it lacks takes the class default. ValueError,
        naming the file (and the field), for anything else."""
        try:
            given = json.loads(Path(path).read_text())
        except ValueError as exc:  # not JSON, or not UTF-8 text
            raise ValueError(f"{path}: not a JSON config file ({exc})") from None
        if not isinstance(given, dict):  # a user's file: ValueError, which the CLI reports in one line
            kind = type(given).__name__
            raise ValueError(f"{path}: a config file is a JSON object of fields, got a {kind}")  # noqa: TRY004
        data = upgrade(given) if upgrade is not None else dict(given)
        sections = {k: data.pop(k.value) for k in DetectorKind if k.value in data}
        unknown = sorted(set(data) - {f.name for f in fields(cls) if f.name != "sections"})
        if unknown:
            raise ValueError(f"{path}: unknown config fields {unknown}")
        try:
            return cls(**data, sections=sections)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
