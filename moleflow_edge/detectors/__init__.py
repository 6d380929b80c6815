"""Detector kinds behind one interface (protocol.py): the flow and the memory bank."""

from __future__ import annotations

from moleflow_edge.config import DetectorKind
from moleflow_edge.detectors.flow import FlowDetector
from moleflow_edge.detectors.memory import MemoryDetector
from moleflow_edge.detectors.protocol import DetectorFit, FitOptions, TaskDetector, TrainingSet

DETECTORS: dict[DetectorKind, TaskDetector] = {d.kind: d for d in (FlowDetector(), MemoryDetector())}


def detector_of(kind: DetectorKind | str) -> TaskDetector:
    """The detector that fits and scores tasks of ``kind``."""
    return DETECTORS[DetectorKind(kind)]


__all__ = ["DETECTORS", "DetectorFit", "FitOptions", "TaskDetector", "TrainingSet", "detector_of"]
