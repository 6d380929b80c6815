"""What a caller chooses about running an export, in two frozen objects: how to load it
(RuntimeOptions: Runtime.load, run, the demo, latency-target candidates) and how to run a source
through it (RunOptions: run_source). Values are checked once, here, when the object is made."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import TypeVar

from moleflow_edge.contract import Precision
from moleflow_edge.errors import InputError
from moleflow_edge.targets import Backend

DEFAULT_MAX_RESIDENT_TASKS = 8
# longest side of an anomaly map in pixels: a 20000x20000 frame would otherwise get a 1.6 GB map
DEFAULT_MAX_MAP_SIDE = 2048

E = TypeVar("E", bound=Enum)


def enum_member(cls: type[E], value: object, what: str) -> E:
    """``value`` (a member or its name in any case) as a member of ``cls``, or a ValueError naming the choices."""
    try:
        return cls(value.value if isinstance(value, cls) else str(value).lower())
    except ValueError:
        choices = ", ".join(str(m.value) for m in cls)
        raise InputError(f"unknown {what} {value!r}; choose one of: {choices}") from None


def check_target_ms(target_ms: object) -> None:
    """Refuse a latency target that no timing can be compared with (<= 0, NaN, inf, not a number)."""
    ok = isinstance(target_ms, (int, float)) and not isinstance(target_ms, bool) and math.isfinite(target_ms)
    if not (ok and target_ms > 0):  # type: ignore[operator]
        raise InputError(f"the latency target must be a number of milliseconds > 0, got {target_ms!r}")


@dataclass(frozen=True)
class RuntimeOptions:
    """How Runtime.load opens an export.

    ``backend``: an engine or deployment target name (auto: the first of the target table that
    works here). ``precision``: fp32 when not given (with a latency target: the one to time, else
    all). Task engines stay resident up to ``max_resident_tasks`` and ``memory_budget_mb``;
    ``preload`` loads them at once. ``providers`` and ``io_binding`` tune onnxruntime.
    ``trusted_keys``: public key files; an unsigned or wrongly signed export is then refused.
    ``max_map_side`` caps the anomaly map's longest side (None: the frame's own size).
    ``latency_target_ms``: time the candidates and load the most accurate one that meets it.
    """

    backend: Backend | str = Backend.AUTO
    precision: Precision | str | None = None
    max_resident_tasks: int | None = DEFAULT_MAX_RESIDENT_TASKS
    memory_budget_mb: float | None = None
    threads: int | None = None
    device_id: int = 0
    providers: tuple[str, ...] | None = None
    io_binding: bool | None = None
    preload: bool = False
    trusted_keys: tuple[str | Path, ...] | None = None
    max_map_side: int | None = DEFAULT_MAX_MAP_SIDE
    latency_target_ms: float | None = None

    def __post_init__(self) -> None:
        if self.precision is not None:
            object.__setattr__(self, "precision", enum_member(Precision, self.precision, "precision"))
        for name in ("providers", "trusted_keys"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        if self.latency_target_ms is not None:
            check_target_ms(self.latency_target_ms)
            if self.providers is not None:
                raise InputError("providers and latency_target_ms cannot be combined: each timed target has its own")
        if self.max_map_side is not None and self.max_map_side < 1:
            raise InputError(f"max_map_side must be >= 1 pixel or None, got {self.max_map_side}")

    @property
    def chosen_precision(self) -> Precision:
        """The precision to load: fp32 unless one was asked for."""
        return Precision.FP32 if self.precision is None else self.precision  # type: ignore[return-value]

    def as_candidate(self, target: str, precision: Precision) -> RuntimeOptions:
        """These options narrowed to one latency-target candidate: one resident engine, nothing timed again."""
        return replace(
            self, backend=target, precision=precision, max_resident_tasks=1, memory_budget_mb=None, preload=False,
            latency_target_ms=None,
        )  # fmt: skip


@dataclass(frozen=True)
class RunOptions:
    """How run_source runs a source through an export.

    One JSON line per frame; overlays to ``save_dir`` when given, a window with ``show``;
    ``batch_size`` frames per inference call; at most ``max_frames``; a camera or stream that
    stops is reopened ``camera_retries`` times, ``retry_delay_s`` apart; ``check`` loads every
    task's graph before the first frame; ``follow`` keeps taking new image files as they are
    written to a folder source (runtime/folder_follow.py) until ``max_frames`` or Ctrl-C.
    """

    export_dir: str | Path
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    save_dir: str | Path | None = None
    show: bool = False
    batch_size: int = 1
    max_frames: int | None = None
    camera_retries: int = 5
    retry_delay_s: float = 2.0
    check: bool = False
    follow: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_frames is not None and self.max_frames < 0:
            raise InputError(f"max_frames must be >= 0, got {self.max_frames}")


@dataclass(frozen=True)
class LinkOptions:
    """How a client (RemoteRuntime, ``run --server``) waits on a moleflow-edge serve, so that it never hangs.

    ``connect_timeout_s`` bounds opening a connection and the small calls (readiness, what is served);
    ``timeout_s`` bounds each inference request, from sending it to its whole answer (a server that
    stops answering mid-stream ends there). A call that fails on the way (refused, reset, closed,
    unavailable, past its deadline) is tried again ``retries`` times, ``retry_delay_s`` apart; then
    the client gives up (ServerLost: ``run`` exits 3). The longest wait before that is
    ``(retries + 1) * timeout_s + retries * retry_delay_s``.
    """

    connect_timeout_s: float = 5.0
    timeout_s: float = 30.0  # a cold engine load on the server answers its first frame late
    retries: int = 5
    retry_delay_s: float = 2.0

    def __post_init__(self) -> None:
        for name in ("connect_timeout_s", "timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise InputError(f"{name} must be a number of seconds > 0, got {value!r}")
        if self.retries < 0 or not self.retry_delay_s >= 0:
            raise InputError(f"retries and retry_delay_s must be >= 0, got {self.retries} and {self.retry_delay_s}")

    @property
    def longest_wait_s(self) -> float:
        """The longest a failing call keeps the caller before ServerLost."""
        return (self.retries + 1) * self.timeout_s + self.retries * self.retry_delay_s
