"""Changing an export's decisions on the line: a threshold moved by calibration or by hand is a new
committed (and, for a signed export, signed) manifest, and the value it replaces stays in the
task's ``threshold_history`` with the time and the reason. Torch-free.

A running `run` or `serve` sees the new manifest as it sees any export: through the one atomic
rename of manifest.json. An update reads the manifest, changes decision fields only (no file it
lists), and commits under the export's lock, refusing when the manifest changed meanwhile (an
export or another calibration in between), so no change is lost silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from moleflow_edge.contract import (
    MANIFEST_FILE,
    CalibrationRecord,
    Manifest,
    ManifestError,
    Precision,
    TaskEntry,
    ThresholdChange,
    is_signed,
    load_manifest,
    save_manifest,
)
from moleflow_edge.errors import UserError
from moleflow_edge.locking import FolderLock
from moleflow_edge.serving.triton.decisions import refresh_triton_repository
from moleflow_edge.signing import load_private_key, load_public_keys, sign_from_model

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


class UpdateError(UserError):
    """The export cannot be updated as asked (signed without a key, changed meanwhile, no such task)."""


@dataclass
class ManifestUpdate:
    """An export's manifest read for a change, with the bytes it was read from and the key to sign it."""

    root: Path
    manifest: Manifest
    original: bytes
    signing_key: Ed25519PrivateKey | None

    @classmethod
    def open(
        cls, export_dir: str | Path, sign: str | Path | None = None, trusted_keys: list[str | Path] | None = None,
        write: bool = True,
    ) -> ManifestUpdate:  # fmt: skip
        """Read and verify the manifest. A signed export is re-signed only after its signature verifies
        with ``sign``'s public half or ``trusted_keys``, and is refused without ``sign`` (an unsigned
        manifest would be refused wherever trusted keys are configured)."""
        root = Path(export_dir)
        signing_key = None if sign is None else load_private_key(sign)
        trusted = load_public_keys(trusted_keys) if trusted_keys else None
        if write and signing_key is not None and (root / MANIFEST_FILE).is_file() and not is_signed(root):
            raise UpdateError(f"{root} is not signed, so it will not be signed here: {sign_from_model(root)}, "
                              "then calibrate --sign KEY")  # fmt: skip
        manifest = load_manifest(root, verify=True, trusted_keys=trusted, rewrite=write, signing_key=signing_key)
        return cls(root, manifest, (root / MANIFEST_FILE).read_bytes(), signing_key)

    def commit(self) -> None:
        """Save the changed manifest atomically under the export's lock: the one commit."""
        with FolderLock(self.root, "calibration"):
            if (self.root / MANIFEST_FILE).read_bytes() != self.original:
                raise UpdateError(f"{self.root / MANIFEST_FILE} changed meanwhile (a new export?); run it again")
            save_manifest(self.root, self.manifest, self.signing_key)
            refresh_triton_repository(self.root)  # EXPORT/triton serves the new decisions too


def now_utc() -> str:
    """The history's time stamps: UTC, to the second, ISO 8601."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def record_threshold(
    entry: TaskEntry, precision: Precision, value: float, reason: str, when: str | None = None
) -> bool:
    """Set ``entry``'s threshold at ``precision`` and add it to the history; False (and no entry) when the
    value is unchanged, so calibrating twice on the same images writes the same manifest."""
    if entry.thresholds.get(precision) == value:
        return False
    entry.thresholds[precision] = value
    entry.threshold_history.append(ThresholdChange(value, precision, when or now_utc(), reason))
    return True


def set_threshold(
    export_dir: str | Path,
    task: str,
    value: float,
    precision: Precision = Precision.FP32,
    reason: str = "",
    sign: str | Path | None = None,
    trusted_keys: list[str | Path] | None = None,
) -> float | None:
    """Set ``task``'s threshold at ``precision`` by hand (anomaly when score > ``value``) as a new
    committed manifest; returns the value it replaced (None if it had none). The precision's
    calibration record then says the threshold was set by hand, and why."""
    if not math.isfinite(value):
        raise UpdateError(f"--threshold must be a finite number, got {value}")
    chosen = Precision(precision)
    update = ManifestUpdate.open(export_dir, sign, trusted_keys)
    try:
        entry = update.manifest.task(task)
    except ManifestError as exc:
        raise UpdateError(str(exc)) from None
    if chosen not in entry.graphs:
        has = sorted(p.value for p in entry.graphs)
        raise UpdateError(f"task {task!r} has no {chosen.value} graph in {update.root} (has {has})")
    old = entry.thresholds.get(chosen)
    why = "set by hand" + (f": {reason}" if reason else "")
    if record_threshold(entry, chosen, float(value), why):
        before = entry.calibrations.get(chosen)  # the limit is unchanged: how it was made stays
        entry.calibrations[chosen] = CalibrationRecord(
            chosen, why, distance_limit_method=None if before is None else before.distance_limit_method,
            max_normal_distance=None if before is None else before.max_normal_distance,
        )  # fmt: skip
        update.commit()
    return old
