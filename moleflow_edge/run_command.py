"""`moleflow-edge run`, the command: frames of a source through an export here or a server there
(runtime/camera_loop.py does the work; exit_codes.py says how it ended). Registered on the app by
cli.py; imports nothing heavy until it runs, like every command there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from moleflow_edge.cli_support import fail, given
from moleflow_edge.errors import UserError
from moleflow_edge.targets import TargetChoice


def run(
    export_dir: Optional[Path] = typer.Option(None, "--export", help="Export directory (manifest and graphs)."),
    server: Optional[str] = typer.Option(
        None, help="Instead of --export: a moleflow-edge serve at HOST:PORT (Triton's HTTP port) or grpc://HOST:PORT."
    ),
    send: Optional[str] = typer.Option(
        None,
        show_default=False,
        help="With --server, frames travel raw (exact), png (lossless) or jpeg (lossy) "
        "(default: RemoteRuntime's encoding).",
    ),
    source: str = typer.Option(
        ...,
        help="Image folder, image file, video file, camera:N, a stream URL (rtsp://, http://) or a GStreamer "
        "pipeline ending in appsink.",
    ),
    backend: TargetChoice = typer.Option(
        "auto", help="Deployment target (README, Deployment targets); auto tries them best first."
    ),
    precision: Optional[str] = typer.Option(
        None, help="Which exported precision to run (default fp32; with --latency-target, the one to time, else all)."
    ),
    latency_target: Optional[float] = typer.Option(
        None,
        help="Milliseconds per frame at batch 1: time the export's precisions and targets here (cached in "
        "EXPORT/engines/) and run the most accurate one that meets it; says which and why.",
    ),
    save: Optional[Path] = typer.Option(None, help="Write an overlay image per frame here."),
    show: bool = typer.Option(False, help="Show the overlays in a window."),
    batch_size: Optional[int] = typer.Option(
        None, min=1, show_default=False, help="Frames per inference call (default: RunOptions.batch_size)."
    ),
    follow: bool = typer.Option(
        False,
        help="With a folder --source: keep taking new image files as they are completely written to it "
        "(a camera's FTP/SMB drop folder), until --max-frames or Ctrl-C.",
    ),
    max_frames: Optional[int] = typer.Option(None, min=0, help="Stop after this many frames."),
    check: bool = typer.Option(False, help="Load every task's graph before the first frame; exit 4 if one fails."),
    trusted_key: Optional[list[Path]] = typer.Option(
        None, help="Public key file (repeatable): refuse exports not signed by one of these keys."
    ),
    map_size: Optional[int] = typer.Option(
        None,
        min=1,
        show_default=False,
        help="Longest side of the anomaly map in pixels, capping huge frames (default: RuntimeOptions.max_map_side).",
    ),
    retries: Optional[int] = typer.Option(
        None,
        min=0,
        show_default=False,
        help="Times a camera or stream that stops is reopened, or a lost server "
        "tried again, before exit 3 (default: RunOptions.camera_retries; with --server, LinkOptions.retries).",
    ),
    retry_delay: Optional[float] = typer.Option(
        None,
        min=0.0,
        show_default=False,
        help="Seconds between those tries "
        "(default: RunOptions.retry_delay_s; with --server, LinkOptions.retry_delay_s).",
    ),
    connect_timeout: float = typer.Option(
        default_factory=lambda: _link_default("connect_timeout_s"),
        show_default=False,
        help="With --server, seconds to wait for a connection (gRPC: for a readiness or info call) before it counts "
        "as a failed try (default: LinkOptions.connect_timeout_s, docs/serving.md).",
    ),
    timeout: float = typer.Option(
        default_factory=lambda: _link_default("timeout_s"),
        show_default=False,
        help="With --server, seconds an inference request may go unanswered before it counts as a failed try; "
        "after --retries failed tries, one line and exit 3 (default: LinkOptions.timeout_s, docs/serving.md).",
    ),
) -> None:
    """Inspect frames: one JSON line per frame on stdout, a summary at the end."""
    from moleflow_edge.exit_codes import EXIT_CAMERA_LOST, RUN_EXIT_CODES
    from moleflow_edge.runtime import RunOptions, RuntimeOptions, ServerLost, run_source

    if (export_dir is None) == (server is None):
        fail("give exactly one of --export DIR (run here) or --server HOST:PORT (run on a moleflow-edge serve)")
    if server is not None and (backend.value != "auto" or precision or latency_target is not None or trusted_key):
        fail("--backend, --precision, --latency-target and --trusted-key are options of the server (serve), not here")
    link = given(retries=retries, retry_delay_s=retry_delay)  # unset: the options class's default
    map_side = given(max_map_side=map_size)
    try:
        remote = None
        if server is not None:
            from moleflow_edge.serving.client import RemoteRuntime

            remote = RemoteRuntime(server, connect_timeout_s=connect_timeout, timeout_s=timeout,
                                   maps=save is not None or show, **given(encoding=send), **map_side, **link)  # fmt: skip
        loading = RuntimeOptions(
            backend.value, precision, trusted_keys=trusted_key, latency_target_ms=latency_target, **map_side
        )
        where = export_dir or server  # only named in messages when a RemoteRuntime is given
        camera = given(camera_retries=retries, retry_delay_s=retry_delay, batch_size=batch_size)
        options = RunOptions(where, loading, save, show, max_frames=max_frames, check=check, follow=follow,
                             **camera)  # fmt: skip
        outcome = run_source(source, options, runtime=remote)
    except UserError as exc:
        fail(str(exc))
    except ServerLost as exc:  # the server did not answer at start
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(EXIT_CAMERA_LOST) from None
    raise typer.Exit(RUN_EXIT_CODES[outcome])


def _link_default(name: str) -> float:
    """A default of run --server's deadlines, from the one place that holds them (imported only when run runs)."""
    from moleflow_edge.runtime.options import LinkOptions

    return getattr(LinkOptions(), name)
