"""What a caller may use of a loaded export, wherever it runs: here (Runtime) or on a moleflow-edge serve
(serving.client.RemoteRuntime). The camera loop (run_source) and Python code are typed against this,
so that either one can stand in for the other."""

from __future__ import annotations

from typing import Protocol, Self, runtime_checkable

from moleflow_edge.contract import Precision
from moleflow_edge.errors import LinkError
from moleflow_edge.runtime.engine_cache import EngineStats
from moleflow_edge.runtime.engine_select import EngineChoice
from moleflow_edge.runtime.result import FrameResult

__all__ = ["InferenceRuntime", "ServerLost"]


class ServerLost(LinkError):
    """The inference server stopped answering and retrying did not help: what a served InferenceRuntime
    raises where a local one would have answered (``run --server`` exits 3)."""


@runtime_checkable
class InferenceRuntime(Protocol):
    """A loaded export: frames in, FrameResults out, and what was loaded, for start-up lines and summaries.
    One per thread; a context manager that releases what it holds."""

    max_map_side: int | None  # longest side of an anomaly map (and of run's overlays); None: the frame's own
    engine_choice: EngineChoice | None  # what a latency target chose and why; None without one

    @property
    def tasks(self) -> list[str]: ...

    @property
    def precision(self) -> Precision: ...

    @property
    def image_size(self) -> int: ...

    @property
    def description(self) -> str:
        """The engine and device, in words."""

    @property
    def uncalibrated(self) -> list[str]:
        """Tasks without a threshold at the loaded precision: their frames get a score, no decision."""

    @property
    def load_failures(self) -> dict[str, str]:
        """Task -> why its detector graph could not be loaded or run."""

    @property
    def engine_stats(self) -> EngineStats: ...

    def task_status(self) -> dict[str, str]:
        """Per task, whether and how it is calibrated at the loaded precision."""

    def check_graphs(self) -> None:
        """Load every task's detector graph once; BackendError naming those that fail."""

    def infer(self, frames: object, *, with_maps: bool = True) -> list[FrameResult]:
        """BGR uint8 HxWx3 frame(s) of any size -> one FrameResult per frame, in input order."""

    def infer_one(self, frame: object, *, with_maps: bool = True) -> FrameResult: ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...
