"""The export manifest's older format versions, upgraded to the one this toolkit writes (SERVES).

Signatures cover the manifest as it was written (contract.signed_payload of the file's own JSON), so
a signature is checked before the upgrade and a signed version-1 export still verifies; a rewrite
(calibrate, set-threshold, export) writes the current version and signs it again.

Version 1 (toolkit 0.1.0 and before; fields added over its life were optional):
  * a task without ``detector`` is a flow (exports made before memory tasks), and such exports kept
    their detector graphs under flow/ (OLD_DETECTOR_DIR) instead of detectors/: the files are listed
    by path and load as they are; the exporter sweeps what that folder no longer lists;
  * a task's one ``threshold`` and ``calibration`` (before thresholds per precision) is the
    threshold at the precision its record names (fp32 where it names none);
  * a threshold without an entry in ``threshold_history`` (set before the history was kept) enters
    the history first, with no time and the reason BEFORE_HISTORY;
  * without ``router_limit_quantile``/``router_limit_margin`` the config's defaults apply;
  * a calibration record without ``precision`` is the one of the precision it is filed under.
Version 2 (this toolkit): the same fields, every one declared in contract.py (CalibrationRecord,
EngineRecord, ThresholdChange), with per-precision maps keyed by the precision's name.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from moleflow_edge.config import DetectorKind, MoleFlowConfig
from moleflow_edge.migrations import FormatVersionError

__all__ = ["BEFORE_HISTORY", "OLD_DETECTOR_DIR", "SERVES", "upgrade"]

SERVES = 2  # the manifest format version this module upgrades to: contract.FORMAT_VERSION
OLD_DETECTOR_DIR = "flow"  # where version-1 exports made before memory tasks keep detector graphs
BEFORE_HISTORY = "set before the threshold history was kept"
_FP32 = "fp32"  # the precision of a version-1 threshold whose record names none


def upgrade(data: dict) -> dict:
    """``data`` (a manifest's JSON object, any version this toolkit reads) in version SERVES, as a new
    dict; parts too malformed to upgrade are left for the schema check to name. FormatVersionError
    for a version this toolkit does not read."""
    version = data.get("format_version")
    while version != SERVES:
        step = _STEPS.get(version) if isinstance(version, int) and not isinstance(version, bool) else None
        if step is None:
            readable = ", ".join(map(str, [*_STEPS, SERVES]))
            raise FormatVersionError(f"has format version {version!r}; this toolkit reads versions {readable}: "
                                     "re-export the model with this toolkit")  # fmt: skip
        data = step(data)
        version = data["format_version"]
    return data


def _from_v1(data: dict) -> dict:
    data = copy.deepcopy(data)
    data.setdefault("router_limit_quantile", MoleFlowConfig.router_limit_quantile)
    data.setdefault("router_limit_margin", MoleFlowConfig.router_limit_margin)
    for task in data.get("tasks", []) if isinstance(data.get("tasks"), list) else []:
        if isinstance(task, dict):
            _task_from_v1(task)
    data["format_version"] = 2
    return data


def _task_from_v1(task: dict) -> None:
    task.setdefault("detector", DetectorKind.FLOW.value)
    if "threshold" in task or "calibration" in task:
        threshold, record = task.pop("threshold", None), task.pop("calibration", None) or {}
        if threshold is not None:
            precision = record.get("precision", _FP32) if isinstance(record, dict) else _FP32
            task["thresholds"], task["calibrations"] = {precision: threshold}, {precision: record}
    calibrations, thresholds = task.get("calibrations"), task.get("thresholds")
    if isinstance(calibrations, dict):
        for precision, record in calibrations.items():
            if isinstance(record, dict):
                record.setdefault("precision", precision)
    history = task.setdefault("threshold_history", [])
    if isinstance(thresholds, dict) and isinstance(history, list):
        kept = {h.get("precision") for h in history if isinstance(h, dict)}
        before = [{"value": v, "precision": p, "time": None, "reason": BEFORE_HISTORY}
                  for p, v in thresholds.items() if p not in kept]  # fmt: skip
        history[:0] = before


_STEPS: dict[int, Callable[[dict], dict]] = {1: _from_v1}  # version -> its upgrade to the next
