"""Backends: what an inference engine must do, and which deployment targets are installed here.

A backend runs three kinds of graph from an export: the shared backbone (once per frame),
the router (GPU backends; CPU backends route in numpy) and one detector graph per task (a flow
or a memory bank: the same inputs and outputs, so nothing here depends on the kind). Features
come back from ``backbone`` as an opaque FeatureBatch, so that a GPU backend keeps the
embedding on the device until a task's detector consumes it; only scores and distances
return to the host.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moleflow_edge.contract import ArtifactFile, Manifest, ManifestError, Precision, TaskEntry, file_sha256
from moleflow_edge.errors import EngineError
from moleflow_edge.runtime.options import RuntimeOptions
from moleflow_edge.targets import TARGETS, Backend, module_available, not_installed


class BackendError(EngineError):
    """A backend that is not installed, cannot run this export, or failed to run."""


@dataclass
class FeatureBatch:
    """Backbone output for one batch. ``routing`` is the (B,C) host feature when routing is done in
    numpy; ``embedding`` is a host array (B,D,H,W) or a backend-owned device handle."""

    size: int
    embedding: object
    routing: np.ndarray | None = None
    device_routing: object = None


class DetectorEngine(ABC):
    """One task's detector graph, loaded and ready: embedding rows -> patch scores (n,H,W), image scores (n,)."""

    task: str
    estimated_bytes: int  # what it holds in memory (weights and buffers), for the resident budget

    @abstractmethod
    def run(self, features: FeatureBatch, rows: list[int]) -> tuple[np.ndarray, np.ndarray]: ...

    def start(self, features: FeatureBatch, rows: list[int]) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
        """Begin ``run`` and return what collects its result: the Runtime starts every task of a batch
        before it collects any. Here it runs at once; an engine that can send the work off (Triton's
        BLS ``async_exec``) returns before it is done."""
        done = self.run(features, rows)
        return lambda: done

    def close(self) -> None:  # noqa: B027 - a no-op default: only engines that hold something override it
        """Release what the engine holds; the cache calls it when the engine leaves."""


class GraphBackend(ABC):
    """What the Runtime needs from a backend. Not thread-safe: one backend per camera thread.

    Every engine class is listed in the one backend table (targets.ENGINES) and built by
    create_backend with this constructor's signature."""

    kind: Backend
    root: Path
    precision: Precision
    device: str = "cpu"  # "cpu" or "cuda:<id>"
    provider: str | None = None  # the onnxruntime execution provider the sessions got; None for other engines
    routes_on_device: bool = False  # True: distances() runs router graph/engine; False: numpy RouterTable
    max_batch: int | None = None  # engines built for a fixed maximum batch; None = any
    manifest: Manifest | None = None  # the export it was loaded for

    def __init__(self, root: Path, manifest: Manifest, options: RuntimeOptions) -> None:
        """``root``: the folder the graphs are read from; ``options``: how the export is opened (the
        precision, threads, device, providers; each engine reads the fields that concern it)."""
        self.root, self.manifest, self.precision = root, manifest, options.chosen_precision

    @abstractmethod
    def backbone(self, images: np.ndarray) -> FeatureBatch:
        """(B,S,S,3) uint8 BGR, contiguous -> features of the batch."""

    def distances(self, features: FeatureBatch) -> np.ndarray:
        """(B,T) squared Mahalanobis distances on the device; only for routes_on_device backends."""
        raise BackendError(f"{self.kind.value} routes on the host")

    @abstractmethod
    def load_detector(self, entry: TaskEntry) -> DetectorEngine: ...

    def estimate_bytes(self, entry: TaskEntry) -> int:
        """Memory a task's engine will take, guessed before loading it (its weights' size by default)."""
        artifact = entry.graphs.get(self.precision)
        return 0 if artifact is None else artifact_bytes(self.root, artifact)

    def runs_unchanged(self, manifest: Manifest) -> bool:
        """Whether this loaded backend runs ``manifest`` (a newly committed one of the same export) as
        it is: the same backbone graph, engines and shapes, and routing on the host (a router on the
        device is built for one task count). A live switch then keeps it, and its warm task engines."""
        old = self.manifest
        if old is None or self.routes_on_device:
            return False
        shapes = ("image_size", "grid", "embed_dim", "routing_dim", "input_layout", "input_dtype", "channel_order")
        return (
            all(getattr(old, name) == getattr(manifest, name) for name in shapes)
            and old.backbone_graphs.get(self.precision) == manifest.backbone_graphs.get(self.precision)
            and old.engines == manifest.engines
        )

    def describe(self) -> str:
        return f"{self.kind.value} on {self.device}"

    def close(self) -> None:  # noqa: B027 - a no-op default: only engines that hold something override it
        """Release sessions and device memory."""


# --- what is installed -----------------------------------------------------------------------------
def available_backends() -> list[Backend]:
    """Engines with at least one installed target here, in the table's order (best first)."""
    return list(dict.fromkeys(t.backend for t in TARGETS if not_installed(t) is None))


def require(module: str, backend: Backend, install: str) -> None:
    """Optional dependencies are checked where used, with what to install."""
    if not module_available(module):
        raise BackendError(f"backend {backend.value!r} needs the package {module!r}: pip install {install}")


# --- artifacts -------------------------------------------------------------------------------------
def read_verified(root: Path, artifact: ArtifactFile) -> Path:
    """Path of an artifact after re-checking its sha256: a lazily loaded task is checked again when
    it loads, so a file replaced while the runtime runs is refused, not silently used."""
    for name, expected in artifact.paths():
        path = root / name
        if not path.is_file():
            raise ManifestError(f"{path} is listed in the manifest but missing")
        if file_sha256(path) != expected:
            raise ManifestError(
                f"{path} changed after the export was loaded (sha256 differs from the manifest): "
                "re-export it and reload the runtime"
            )
    return root / artifact.file


def _graph_of_precision(
    graphs: dict[Precision, ArtifactFile], precision: Precision, owner: str, kind: str
) -> ArtifactFile:
    """One lookup for every graph the runtime loads: a precision the export lacks is a ManifestError
    that names the graph, what the export has and how to get the missing one."""
    try:
        return graphs[precision]
    except KeyError:
        raise ManifestError(
            f"{owner} has no {precision.value} {kind} graph (has {sorted(p.value for p in graphs)}): "
            f"export with --precision {precision.value}"
        ) from None


def graph_for(entry: TaskEntry, precision: Precision) -> ArtifactFile:
    return _graph_of_precision(entry.graphs, precision, f"task {entry.name!r}", "detector")


def backbone_graph(manifest: Manifest, precision: Precision) -> ArtifactFile:
    return _graph_of_precision(manifest.backbone_graphs, precision, "the export", "backbone")


def artifact_bytes(root: Path, artifact: ArtifactFile) -> int:
    return sum((root / name).stat().st_size for name, _ in artifact.paths() if (root / name).is_file())
