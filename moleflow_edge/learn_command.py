"""`moleflow-edge learn`, the command: its options are LearnOptions' (learn.py does the work).

Registered on the app by cli.py; imports torch only when it runs, like every command there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from moleflow_edge.cli_support import (
    DEVICE_OPTION_HELP,
    THREADS_OPTION_HELP,
    chosen_device,
    fail,
    frame_progress,
    given,
    set_torch_threads,
)
from moleflow_edge.config import DetectorKind
from moleflow_edge.errors import UserError
from moleflow_edge.learn_options import LEARNED_DIR, LearnOptions


def learn(
    source: str = typer.Option(
        ...,
        help="Good frames of the new product: image folder, video file, camera:N or a stream URL (rtsp://, http://).",
    ),
    task: str = typer.Option(..., help="Name of the new product (task)."),
    model: Path = typer.Option(
        ..., help=f"Model directory to add the task to; the frames are kept in MODEL/{LEARNED_DIR}/TASK (MVTec layout)."
    ),
    export_dir: Path = typer.Option(
        ..., "--export", help="The export the line runs: the task is added to it in place."
    ),
    frames: int = typer.Option(
        LearnOptions.frames, min=1, help="Good frames to take; the last third is held out to calibrate the threshold."
    ),
    detector: Optional[DetectorKind] = typer.Option(
        None, help="memory (no gradient step: seconds) or flow; default: the model's config (flow)."
    ),
    target_fpr: Optional[float] = typer.Option(
        None,
        show_default=False,
        help="False-positive rate the threshold aims at (default: calibrate's, "
        "calibration/order_statistics.py TARGET_FPR).",
    ),
    precision: list[str] = typer.Option(
        list(LearnOptions.precisions), help="fp32 and/or fp16 (repeat or comma-separate)."
    ),
    sign: Optional[Path] = typer.Option(None, help="Private key that signs the export's manifest (signed exports)."),
    trusted_key: Optional[list[Path]] = typer.Option(
        None, help="Public key file (repeatable) that may have signed the export (besides --sign's)."
    ),
    device: str = typer.Option(LearnOptions.device, help=DEVICE_OPTION_HELP),
    threads: Optional[int] = typer.Option(None, min=1, help=THREADS_OPTION_HELP),
) -> None:
    """Add a product to a running line: good frames from its source -> train -> export into the line's
    export -> calibrate on held-out frames; earlier tasks stay bit for bit as they were."""
    from moleflow_edge.learn import learn as learn_product

    def say(line: str) -> None:
        typer.echo(f"\n{line}", err=True, nl=False)

    where = chosen_device(device, lambda _: "training")
    set_torch_threads(threads)
    chosen = tuple(p.strip() for item in precision for p in item.split(",") if p.strip())
    options = LearnOptions(frames, detector, precisions=chosen, sign=sign, trusted_keys=tuple(trusted_key or ()),
                           device=str(where), **given(target_fpr=target_fpr))  # fmt: skip
    try:
        report = learn_product(source, task, model, export_dir, options, frame_progress, say)
    except UserError as exc:
        typer.echo("", err=True)
        fail(str(exc))
    typer.echo("", err=True)
    typer.echo(report.summary())
