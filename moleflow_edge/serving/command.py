"""`moleflow-edge serve`, the command: its options are the server's (serving/server.py does the work).

Registered on the app by cli.py; imports nothing heavy until it runs, like every command there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from moleflow_edge.errors import UserError
from moleflow_edge.serving.options import ServeOptions
from moleflow_edge.targets import TargetChoice

DEFAULT = ServeOptions()  # every default below is the options class's own (serving/options.py)


def serve(
    export_dir: Path = typer.Option(..., "--export", help="Export directory, checked and loaded once at start."),
    backend: TargetChoice = typer.Option("auto", help="Deployment target the server runs the graphs on."),
    precision: Optional[str] = typer.Option(None, help="Which exported precision to serve (default fp32)."),
    trusted_key: Optional[list[Path]] = typer.Option(
        None, help="Public key file (repeatable): refuse unsigned exports."
    ),
    max_batch: int = typer.Option(DEFAULT.max_batch, help="Most frames Triton's dynamic batcher merges into one run."),
    max_queue_delay_us: int = typer.Option(
        DEFAULT.max_queue_delay_us, help="Microseconds a request may wait for others to batch with."
    ),
    address: str = typer.Option(
        DEFAULT.address, help="Address the endpoints listen on (127.0.0.1: this machine only)."
    ),
    http_port: int = typer.Option(DEFAULT.http_port, help="Triton's HTTP/REST port (health: /v2/health/ready)."),
    grpc_port: int = typer.Option(DEFAULT.grpc_port, help="Triton's gRPC port."),
    metrics_port: int = typer.Option(DEFAULT.metrics_port, help="Triton's Prometheus metrics port (/metrics)."),
    map_size: int = typer.Option(
        DEFAULT.map_side_cap, help="Longest side of an anomaly map a request may ask for, in pixels."
    ),
    drain_timeout: float = typer.Option(
        DEFAULT.drain_timeout_s,
        help="After SIGTERM: seconds the accepted requests may take to be answered (exit 6 if not).",
    ),
) -> None:
    """Serve the export to many cameras: a Triton Inference Server (PyTriton) with the model moleflow;
    SIGTERM or Ctrl-C drains it: not ready, new requests refused, every accepted one answered."""
    from moleflow_edge.serving.server import serve_export

    def say(line: str) -> None:
        typer.secho(line, fg=typer.colors.RED if line.startswith("error:") else None, err=True)

    try:
        options = ServeOptions(
            address=address, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
            max_batch=max_batch, max_queue_delay_us=max_queue_delay_us, map_side_cap=map_size,
            drain_timeout_s=drain_timeout,
        )  # fmt: skip
    except UserError as exc:
        say(f"error: {exc}")
        raise typer.Exit(2) from None
    code = serve_export(export_dir, options, say, backend=backend.value, precision=precision, trusted_keys=trusted_key)
    raise typer.Exit(code)
