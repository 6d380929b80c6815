"""Staging and the crash-proof commit of an export directory.

Files are built in EXPORT/.staging-<id>/ and moved to names the live manifest cannot hold:
a graph becomes ``<stem>.<sha16 of its bytes><suffix>`` (content-addressed: a rebuilt,
identical graph keeps its name); an external-weights file keeps the run-unique name its
graph records inside itself. So nothing the live manifest points to is ever overwritten,
and the one atomic rename of manifest.json is the commit: a kill at any moment leaves either
the previous export or the new one loadable. Files no manifest lists and staging folders left
by killed runs are swept after the commit (and stale staging folders before a run starts).
ExportRun is one run on top of that: each artifact reused while intact, else built, checked and
staged, and a report of both (a file that no longer matches its sha256 or its content-addressed
name is rebuilt, and said).
The sweep deletes only regular files (or links themselves) inside the real folder, never
through a symlinked sub-folder.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import onnx

from moleflow_edge.contract import (
    DETECTOR_DIR,
    MANIFEST_FILE,
    ArtifactFile,
    Manifest,
    content_name,
    file_sha256,
    named_by_content,
    save_manifest,
)
from moleflow_edge.export import onnx_graphs
from moleflow_edge.export.artifacts import ExportedFile, ExportError, ExportReport
from moleflow_edge.export.trt_compat import check_tensorrt_compat
from moleflow_edge.migrations.manifest import OLD_DETECTOR_DIR

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

STAGING_PREFIX = ".staging-"
MANAGED_PREFIXES = ("backbone.", "router.")  # top-level files the exporter owns; detectors/ and OLD_DETECTOR_DIR: all
TEMP_MANIFESTS = f".{MANIFEST_FILE}."  # write_atomic's temporary names for the manifest


class Staging:
    """A run's staging folder and the moves its commit will make."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.id = uuid.uuid4().hex[:12]
        self.dir = out / f"{STAGING_PREFIX}{self.id}"
        self.moves: list[tuple[Path, str]] = []

    def path(self, relative: str) -> Path:
        """Where to build ``relative``: a name unique to this run, so that a file written beside it
        (a graph's external weights, named inside the graph) never takes a live file's name."""
        pure = PurePosixPath(relative)
        path = self.dir / pure.parent / f"{pure.stem}.{self.id}{pure.suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def final_name(self, staged: Path) -> str:
        """A staged file's name in the export when it keeps its run-unique name."""
        return staged.relative_to(self.dir).as_posix()

    def keep(self, staged: Path, final: str) -> None:
        self.moves.append((staged, final))

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _damaged(out: Path, artifact: ArtifactFile) -> list[str]:
    """The files of ``artifact`` that are missing, no longer match their sha256, or (its graph) hold
    content other than their content-addressed name says: a hash updated with a swapped file."""
    if not named_by_content(artifact.file, artifact.sha256):
        return [artifact.file]
    return [name for name, sha in artifact.paths() if not (out / name).is_file() or file_sha256(out / name) != sha]


class ExportRun:
    """One export run: the manifest being built, staging, and the report."""

    def __init__(self, out: Path, manifest: Manifest) -> None:
        self.out = out
        self.manifest = manifest
        self.staging = Staging(out)
        self.report = ExportReport(out, manifest)

    def artifact(
        self, relative: str, old: ArtifactFile | None, source: str, build: Callable[[], onnx.ModelProto | bytes]
    ) -> ArtifactFile:
        """Reuse ``old`` if it is intact and from the same source, else build, check and stage the file."""
        started = time.perf_counter()
        if old is not None and old.source_sha256 == source:
            damaged = _damaged(self.out, old)
            if not damaged:
                size = sum((self.out / name).stat().st_size for name, _ in old.paths())
                self.report.files.append(ExportedFile(relative, size, 0.0, True))
                return old
            self.report.rebuilt += damaged  # never reused: rebuilt from the model, and the user is told
        made = build()
        path = self.staging.path(relative)
        data = None
        if isinstance(made, bytes):
            path.write_bytes(made)
        else:
            compat = check_tensorrt_compat(made)
            if not compat.ok:
                raise ExportError(f"{relative} would not load in TensorRT: {'; '.join(compat.problems)}")
            data = onnx_graphs.save_onnx(made, path)
        sha = file_sha256(path)
        artifact = ArtifactFile(content_name(relative, sha), sha, source)
        live = self.out / artifact.file  # the commit replaces a file that holds other content under this name
        if live.is_file() and artifact.file not in self.report.rebuilt and file_sha256(live) != sha:
            self.report.rebuilt.append(artifact.file)
        self.staging.keep(path, artifact.file)
        size = path.stat().st_size
        if data is not None:  # named inside the graph, so it keeps its run-unique name
            artifact.data_file, artifact.data_sha256 = self.staging.final_name(data), file_sha256(data)
            self.staging.keep(data, artifact.data_file)
            size += data.stat().st_size
        self.report.files.append(ExportedFile(relative, size, time.perf_counter() - started, False))
        return artifact

    def commit(self, signing_key: Ed25519PrivateKey | None) -> None:
        """Move the staged files in, swap the manifest, sweep files no longer listed."""
        self.report.removed += commit_export(self.staging, self.manifest, signing_key)


def commit_export(staging: Staging, manifest: Manifest, signing_key: Ed25519PrivateKey | None = None) -> list[str]:
    """Move the staged files to their final names, swap the manifest (the commit), then sweep.

    Returns the files the sweep removed (relative names).
    """
    for staged, final in staging.moves:
        target = staging.out / final
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, target)
    save_manifest(staging.out, manifest, signing_key)
    staging.discard()
    return sweep(staging.out, manifest)


def remove_stale_staging(out: Path) -> None:
    """Staging folders and temporary manifests left by killed runs (the caller holds the export lock)."""
    if not out.is_dir():
        return
    for path in out.iterdir():
        if path.name.startswith(STAGING_PREFIX) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.name.startswith(TEMP_MANIFESTS) and path.name.endswith(".tmp"):
            path.unlink(missing_ok=True)


def sweep(out: Path, manifest: Manifest) -> list[str]:
    """Delete exporter-owned files that ``manifest`` does not list; engines/ is left to the engine builder."""
    remove_stale_staging(out)
    listed = {name for artifact in manifest.artifacts() for name, _ in artifact.paths()}
    owned = [p for p in out.iterdir() if _plain(p) and p.name.startswith(MANAGED_PREFIXES)]
    for folder in (out / DETECTOR_DIR, out / OLD_DETECTOR_DIR):
        if folder.is_dir() and not folder.is_symlink():  # rglob descends into no symlinked folder below it
            owned += [p for p in folder.rglob("*") if _plain(p)]
    removed = []
    for path in sorted(owned):
        name = path.relative_to(out).as_posix()
        if name not in listed:
            path.unlink()
            removed.append(name)
    return removed


def _plain(path: Path) -> bool:
    """A regular file or a link itself (unlinking a link never touches what it points to)."""
    return path.is_symlink() or path.is_file()
