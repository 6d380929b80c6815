"""What `serve` and `export --format triton` are told: the one default of every serving knob, in the
options classes the CLI reads its defaults from. Light (no numpy, no Triton), so that the command line
imports it at once."""

from __future__ import annotations

import math
from dataclasses import dataclass

from moleflow_edge.errors import InputError

__all__ = ["BatchOptions", "ServeOptions"]


@dataclass(frozen=True, kw_only=True)
class BatchOptions:
    """How a served ``moleflow`` batches and how big a map it makes: Triton's dynamic batcher merges up to
    ``max_batch`` frames, waiting at most ``max_queue_delay_us`` for others; ``map_side_cap`` is the
    longest side of an anomaly map any request may ask for. The CLI reads its defaults from here."""

    max_batch: int = 8
    max_queue_delay_us: int = 2000
    map_side_cap: int = 1024

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_queue_delay_us < 0 or self.map_side_cap < 1:
            raise InputError(
                f"the max batch ({self.max_batch}) and the map size ({self.map_side_cap}) must be >= 1 "
                f"and the queue delay ({self.max_queue_delay_us} us) >= 0"
            )


@dataclass(frozen=True, kw_only=True)
class ServeOptions(BatchOptions):
    """Where the server listens (Triton's own default ports), how it batches (BatchOptions) and drains."""

    address: str = "0.0.0.0"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    drain_timeout_s: float = 30.0  # after SIGTERM, how long accepted requests may take to be answered

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (math.isfinite(self.drain_timeout_s) and self.drain_timeout_s > 0):
            raise InputError(f"--drain-timeout must be a number of seconds > 0, got {self.drain_timeout_s}")
        ports = (self.http_port, self.grpc_port, self.metrics_port)
        if len(set(ports)) != 3 or not all(0 < p < 65536 for p in ports):
            raise InputError(f"--http-port, --grpc-port and --metrics-port must be three different ports, got {ports}")

    @property
    def local_host(self) -> str:
        """Where serve reaches its own tritonserver."""
        return "127.0.0.1" if self.address in ("0.0.0.0", "", "::") else self.address
