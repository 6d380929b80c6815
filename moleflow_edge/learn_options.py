"""What `learn` can be told, with the one default of each knob; torch-free, so that the command
line builds its options without importing torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from moleflow_edge.config import DetectorKind

LEARNED_DIR = "learned"  # MODEL/learned: the audit dataset root, MVTec layout
HOLD_OUT_EVERY = 3  # the last 1/3 of the frames is held out for the threshold


def _calibration_default() -> float:
    """calibrate's target false-positive rate, the one default of that knob (imported when options are made:
    the calibration package needs OpenCV, which the command line does not import until a command runs)."""
    from moleflow_edge.calibration.order_statistics import TARGET_FPR

    return TARGET_FPR


@dataclass(frozen=True)
class LearnOptions:
    """How `learn` takes, trains, exports and calibrates a product (the CLI's options)."""

    frames: int = 30  # good frames to take; the last third calibrates the threshold
    detector: DetectorKind | None = None  # None: the model's config (flow); memory needs no gradient step
    target_fpr: float = field(default_factory=_calibration_default)  # calibration's TARGET_FPR
    precisions: tuple[str, ...] = ("fp32",)
    sign: Path | None = None  # private key that signs the export's manifest (a signed export needs it)
    trusted_keys: tuple[Path, ...] = ()
    device: str = "auto"  # as train: auto, cpu, cuda or cuda:N

    @property
    def least_frames(self) -> int:
        """Fewest frames that leave MIN_NORMALS held out for the threshold."""
        from moleflow_edge.calibration.order_statistics import MIN_NORMALS

        return HOLD_OUT_EVERY * MIN_NORMALS
