"""Calibration on the line PC (torch-free): score thresholds and routing limits from normal images, from
frames taken straight from a source, or set by hand; each change a new committed manifest with its history."""

from moleflow_edge.calibration.from_source import calibrate_from_source
from moleflow_edge.calibration.manifest_update import UpdateError, set_threshold
from moleflow_edge.calibration.order_statistics import CalibrationError, QuantileThreshold, threshold_for_fpr
from moleflow_edge.calibration.thresholds import CalibrationReport, TaskCalibration, calibrate

__all__ = [
    "CalibrationError",
    "CalibrationReport",
    "QuantileThreshold",
    "TaskCalibration",
    "UpdateError",
    "calibrate",
    "calibrate_from_source",
    "set_threshold",
    "threshold_for_fpr",
]
