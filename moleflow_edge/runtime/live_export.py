"""Live pick-up: a running `run` or `serve` switches to an export newly committed to its folder.

An export changes only through its commit (export/commit.py): the new graphs are moved in under
content-addressed names first, then manifest.json is replaced by one atomic rename. So a changed
manifest file (its inode, size or times, one stat between batches) means a whole new export is
there, and reading it never sees half of one. The new manifest is checked exactly as at start
(Runtime.check_export: schema, containment, every file's sha256, the signature with the same
trusted keys); then Runtime.successor opens it, keeping the backend and the warm task engines
whose graphs did not change. A manifest that fails is refused in one line and the running export
goes on; a switch is logged with both manifests' digests. Switches happen only between batches,
so a batch finishes on the export it started with. Torch-free.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from moleflow_edge.contract import MANIFEST_FILE, Manifest, ManifestError
from moleflow_edge.runtime.backend import BackendError
from moleflow_edge.runtime.runtime import Runtime

__all__ = ["ExportUse", "LiveExport"]

Stamp = tuple[int, int, int, int] | None


def _stamp(path: os.PathLike[str] | str) -> Stamp:
    """What a commit changes: a new file (inode), its size and times; None while it is missing."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _export_of(runtime: Runtime) -> tuple[Path, Manifest]:
    """The export folder and manifest of a runtime that Runtime.load opened (the only kind watched)."""
    assert runtime.root is not None and runtime.manifest is not None, "a live export needs Runtime.load's runtime"
    return runtime.root, runtime.manifest


@dataclass
class ExportUse:
    """One export's stretch of a run: its manifest digest, tasks, since when and which frames it scored."""

    manifest: str
    tasks: list[str]
    since: str
    frames: int = 0
    first_frame: int | None = None
    last_frame: int | None = None


class LiveExport:
    """The runtime of an export folder that follows its commits. ``current()`` between batches (or
    ``use()`` around a batch where several threads share it, as in `serve`) gives the runtime to
    score with; ``record`` counts what it scored, ``summary`` says which export scored which frames.
    Closing closes the runtime current then (the replaced ones are closed at the switch)."""

    def __init__(self, runtime: Runtime, say: Callable[[str], None]) -> None:
        self.runtime = runtime
        self._say = say
        root, manifest = _export_of(runtime)
        self._path = root / MANIFEST_FILE
        self._seen = _stamp(self._path)
        self._lock = threading.Lock()
        self.uses = [ExportUse(manifest.digest, runtime.tasks, _now())]
        self.refused: list[str] = []  # one line per manifest refused

    def current(self) -> Runtime:
        """The runtime for the next batch: the running one, or that of a newly committed manifest."""
        stamp = _stamp(self._path)
        if stamp == self._seen:
            return self.runtime
        old = self.runtime
        root, running = _export_of(old)
        try:
            manifest = Runtime.check_export(root, old.options)
            if manifest.digest == running.digest:  # rewritten with the same content (touched, re-signed)
                self._seen = stamp
                return old
            new = old.successor(manifest)
        except (ManifestError, BackendError, ValueError, OSError) as exc:
            if _stamp(self._path) != stamp:  # committed again while being read: the next batch reads that one
                return old
            self._seen = stamp
            line = f"refused the export newly committed to {root}: {' '.join(str(exc).split())}"
            self.refused.append(line)
            self._say(f"warning: {line}; still running export {running.digest}")
            return old
        self._seen = stamp
        kept = ", ".join(new.resident_tasks) or "none"
        self._say(
            f"switched to the export newly committed to {root}: manifest {running.digest} -> {manifest.digest}; "
            f"tasks {', '.join(old.tasks)} -> {', '.join(new.tasks)}; task graphs kept warm: {kept}"
        )
        self.uses.append(ExportUse(manifest.digest, new.tasks, _now()))
        self.runtime = new
        return new

    @contextmanager
    def use(self) -> Iterator[Runtime]:
        """The runtime for one batch, held until the batch is done: a switch (and the close of the
        replaced runtime) waits for it, so a frame never runs on a closed or half-loaded export."""
        with self._lock:
            yield self.current()

    def record(self, frames: Sequence[int]) -> None:
        """``frames`` (their indices) were scored by the current export."""
        if not frames:
            return
        use = self.uses[-1]
        use.frames += len(frames)
        use.first_frame = frames[0] if use.first_frame is None else use.first_frame
        use.last_frame = frames[-1]

    @property
    def scored(self) -> int:
        """Frames scored so far, over every export."""
        return sum(use.frames for use in self.uses)

    def summary(self) -> dict[str, object]:
        """For a JSON summary: each export in turn and the frames it scored, and the manifests refused."""
        return {"exports": [asdict(use) for use in self.uses], "refused": list(self.refused)}

    def close(self) -> None:
        self.runtime.close()

    def __enter__(self) -> LiveExport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
