"""Calibration on the line PC (torch-free): score thresholds and routing limits from normal images."""

from moleflow_edge.calibration.thresholds import (
    CalibrationError,
    CalibrationReport,
    QuantileThreshold,
    TaskCalibration,
    calibrate,
    threshold_for_fpr,
)

__all__ = [
    "CalibrationError",
    "CalibrationReport",
    "QuantileThreshold",
    "TaskCalibration",
    "calibrate",
    "threshold_for_fpr",
]
