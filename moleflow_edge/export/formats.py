"""The table of export formats: one row drives argument checks, the CLI help and the benchmark.

Torch-free, so the CLI can list and check formats before importing anything heavy.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from moleflow_edge.contract import Precision


@dataclass(frozen=True)
class FormatSpec:
    """What a format writes and where it runs."""

    suffix: str
    device: str  # "cpu/gpu" where any onnxruntime provider runs it, "gpu" for TensorRT plans
    precisions: tuple[Precision, ...]
    requires: str  # what must be installed to produce it


class ExportFormat(str, Enum):
    """Export formats, e.g. ``moleflow-edge export --format engine``."""

    ONNX = "onnx"
    ENGINE = "engine"

    @property
    def spec(self) -> FormatSpec:
        return FORMATS[self]


FORMATS: dict[ExportFormat, FormatSpec] = {
    ExportFormat.ONNX: FormatSpec(".onnx", "cpu/gpu", tuple(Precision), "moleflow-edge[train]"),
    ExportFormat.ENGINE: FormatSpec(".engine", "gpu", tuple(Precision), "moleflow-edge[tensorrt] on the target GPU"),
}


def check_export_args(fmt: str, precisions: Iterable[str]) -> tuple[ExportFormat, tuple[Precision, ...]]:
    """Validate a format and its precisions against the table; errors name the bad value and the choices."""
    try:
        export_format = ExportFormat(fmt)
    except ValueError:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {[f.value for f in ExportFormat]}") from None
    chosen: list[Precision] = []
    for name in precisions:
        try:
            precision = Precision(name)
        except ValueError:
            raise ValueError(f"unknown precision {name!r}; choose from {[p.value for p in Precision]}") from None
        if precision not in export_format.spec.precisions:
            allowed = [p.value for p in export_format.spec.precisions]
            raise ValueError(f"format {export_format.value!r} does not take precision {name!r} (allowed: {allowed})")
        if precision not in chosen:
            chosen.append(precision)
    if not chosen:
        raise ValueError("give at least one precision (fp32, fp16 or int8)")
    return export_format, tuple(chosen)
