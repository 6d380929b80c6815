"""What every command of the command line shares: one-line failures for user mistakes, output paths
checked before any work, the device and thread choices, and the few-images note."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import typer

from moleflow_edge.router import FEW_IMAGES, limit_widening

if TYPE_CHECKING:
    from moleflow_edge.good_frames import GoodFrames


def fail(message: str) -> None:
    """Print a clear one-line error and exit 2 (no traceback for user mistakes: errors.UserError)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def given(**options: object) -> dict[str, object]:
    """The options the user set (not None): the others keep the one default their options class or
    function holds (the option's help names it), so that no default is written twice."""
    return {name: value for name, value in options.items() if value is not None}


def write_json(path: Path, results: object) -> None:
    """An output file, its folder created if new (check_writable allowed that), written atomically."""
    from moleflow_edge.atomic import write_text_atomic

    write_text_atomic(path, json.dumps(results, indent=2) + "\n")


def writable(path: Optional[Path], option: str, *, directory: bool = False) -> None:
    """Fail before any work when an output path cannot be written (not after an hour of eval)."""
    from moleflow_edge.atomic import OutputError, check_writable

    if path is not None:
        try:
            check_writable(path, option, directory=directory)
        except OutputError as exc:
            fail(str(exc))


def positive_ints(text: str, option: str) -> tuple[int, ...]:
    """'1,8' -> (1, 8); anything else (0, -1, 'x') is a clear error."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        fail(f"{option} takes comma-separated whole numbers >= 1, got {text!r}")
    return values


DEVICE_OPTION_HELP = "auto (CUDA when torch sees a GPU), cpu, cuda or cuda:N."
THREADS_OPTION_HELP = (
    "Torch threads (default: one per core, or 1 when the load average says other work holds the cores)."
)


def chosen_device(spec: str, use: Callable[[str], str]):  # noqa: ANN201 - a torch.device; torch is imported lazily
    """Resolve --device before any work and print the choice and what it is used for (``use`` gets
    the device type, "cpu" or "cuda")."""
    from moleflow_edge.device import DeviceError, describe, resolve_device

    try:
        device = resolve_device(spec)
    except DeviceError as exc:
        fail(str(exc))
    typer.echo(f"device: {describe(device)} ({use(device.type)})", err=True)
    return device


def torch_threads(requested: int | None) -> int | None:
    """--threads, or 1 on a busy machine (saying so); None leaves torch's default."""
    from moleflow_edge.device import choose_threads

    threads, note = choose_threads(requested)
    if note:
        typer.echo(note)
    return threads


def set_torch_threads(requested: int | None) -> None:
    """Apply --threads (or the busy-machine choice) before training or eval starts."""
    if (threads := torch_threads(requested)) is not None:
        import torch

        torch.set_num_threads(threads)


def few_images_note(task: str, images: int | None) -> str | None:
    """What learning ``task`` from few good images means for its limit and threshold; None otherwise."""
    if images is None or images >= FEW_IMAGES:
        return None
    return (
        f"note: {task} was learned from only {images} good images (few: under {FEW_IMAGES}). Its unknown-product limit "
        f"rests on {images} held-out distances and is widened x{limit_widening(images):.2f} for that, so a look-alike "
        f"product may pass as {task}; its detector has seen little normal variation, so expect normal parts to score "
        f"higher than for a well-covered product. Set its score threshold and limit with `calibrate` on held-out "
        f"good images (ROOT/{task}/calib/good) before trusting its decisions."
    )


def frame_progress(taken: GoodFrames) -> None:
    """Frames taken from a --source so far, on one stderr line rewritten in place (ended by the caller)."""
    typer.echo(f"\rframes: {taken.progress()}", err=True, nl=False)
