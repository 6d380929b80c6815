"""`moleflow-edge calibrate`, the command: thresholds and limits from a dataset or a source, or a
threshold set by hand (calibration/ does the work). Registered on the app by cli.py; imports nothing
heavy until it runs, like every command there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from moleflow_edge.cli_support import fail, frame_progress, given
from moleflow_edge.contract import Precision
from moleflow_edge.errors import UserError
from moleflow_edge.router import FEW_IMAGES


def calibrate(
    export_dir: Path = typer.Option(..., "--export", help="Export directory whose manifest gets the thresholds."),
    data: Optional[Path] = typer.Option(None, help="Dataset root: ROOT/<task>/calib/good if present, else test/good."),
    source: Optional[str] = typer.Option(
        None,
        help="Instead of --data: good frames straight from an image folder, video file, camera:N or stream URL. "
        "With one --task every frame is that product; with several (or none: all) the router assigns each frame "
        "and frames it stops as unknown are refused.",
    ),
    threshold: Optional[float] = typer.Option(
        None, help="Instead of --data or --source: set the one --task's threshold to V (anomaly when score > V)."
    ),
    task: Optional[str] = typer.Option(None, help="Comma-separated tasks to calibrate (default: every task)."),
    frames: Optional[int] = typer.Option(
        None, min=1, help="With --source: good frames to take in all (default: as many as --target-fpr needs)."
    ),
    target_fpr: Optional[float] = typer.Option(
        None,
        show_default=False,
        help="False-positive rate the score threshold aims at (default: calibration/order_statistics.py TARGET_FPR).",
    ),
    precision: Precision = typer.Option(
        Precision.FP32, help="Precision that will be deployed (its scores are calibrated)."
    ),
    reason: str = typer.Option("", help="Why the threshold changes: kept in the manifest's threshold history."),
    sign: Optional[Path] = typer.Option(None, help="Private key that signs the calibrated manifest (signed exports)."),
    trusted_key: Optional[list[Path]] = typer.Option(
        None, help="Public key file (repeatable) that may have signed the export (besides --sign's)."
    ),
) -> None:
    """Score thresholds at a target false-positive rate and unknown-product limits, into the manifest
    (a new committed manifest that a running line picks up; the old threshold stays in its history)."""
    from moleflow_edge.calibration import calibrate as calibrate_export
    from moleflow_edge.calibration.from_source import calibrate_from_source
    from moleflow_edge.calibration.manifest_update import set_threshold
    from moleflow_edge.serving.triton.decisions import TRITON_FOLDER, pickup_commands

    if sum(x is not None for x in (data, source, threshold)) != 1:
        fail("give exactly one of --data ROOT, --source SOURCE or --threshold VALUE")
    if frames is not None and source is None:
        fail("--frames takes frames from a --source")
    tasks = [t.strip() for t in task.split(",") if t.strip()] if task else None
    keys = dict(sign=sign, trusted_keys=trusted_key, reason=reason)
    fpr = given(target_fpr=target_fpr)
    try:
        if threshold is not None:
            if not tasks or len(tasks) != 1:
                fail("--threshold sets the threshold of one --task NAME")
            old = set_threshold(export_dir, tasks[0], threshold, precision, **keys)
            typer.echo(f"{tasks[0]}: {precision.value} threshold {old} -> {threshold} (history kept in the manifest)")
        elif source is not None:
            done = calibrate_from_source(export_dir, source, tasks, frames, precision=precision,
                                         progress=frame_progress, **fpr, **keys)  # fmt: skip
            typer.echo("", err=True)
            if len(done.assigned) > 1:
                typer.echo(f"router: {done.assigned}, {done.unknown} unknown (refused), {done.elsewhere} other tasks")
            report = done.report
        else:
            report = calibrate_export(export_dir, data, precision=precision, tasks=tasks, **fpr, **keys)
    except UserError as exc:
        typer.echo("", err=True)  # ends a progress line
        fail(str(exc))
    if (export_dir / TRITON_FOLDER).exists():  # the update refreshed it: only its decisions changed
        typer.echo(pickup_commands(export_dir / TRITON_FOLDER, graphs=False))
    if threshold is not None:
        return
    typer.echo(report.table())
    for t in report.tasks:
        if t.train_images is not None and t.train_images < FEW_IMAGES:
            typer.echo(
                f"note: {t.task} was learned from only {t.train_images} good images; its threshold and limit now "
                f"come from the {t.n} held-out images above and replace its widened training-time limit"
            )
