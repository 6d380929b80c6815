"""Staging and the crash-proof commit of an export directory.

Files are built in EXPORT/.staging-<id>/ and moved to names the live manifest cannot hold:
a graph becomes ``<stem>.<sha16 of its bytes><suffix>`` (content-addressed: a rebuilt,
identical graph keeps its name); an external-weights file keeps the run-unique name its
graph records inside itself. So nothing the live manifest points to is ever overwritten,
and the one atomic rename of manifest.json is the commit: a kill at any moment leaves either
the previous export or the new one loadable. Files no manifest lists and staging folders left
by killed runs are swept after the commit (and stale staging folders before a run starts).
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from moleflow_edge.contract import MANIFEST_FILE, Manifest, save_manifest

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

STAGING_PREFIX = ".staging-"
MANAGED_PREFIXES = ("backbone.", "router.")  # top-level files the exporter owns; flow/ is all ours
TEMP_MANIFESTS = f".{MANIFEST_FILE}."  # write_atomic's temporary names for the manifest


def content_name(relative: str, sha256: str) -> str:
    """flow/a.fp32.onnx + its sha256 -> flow/a.fp32.<first 16 hex digits>.onnx."""
    pure = PurePosixPath(relative)
    return (pure.parent / f"{pure.stem}.{sha256[:16]}{pure.suffix}").as_posix()


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
    owned = [p for p in out.iterdir() if p.is_file() and p.name.startswith(MANAGED_PREFIXES)]
    if (out / "flow").is_dir():
        owned += [p for p in (out / "flow").rglob("*") if p.is_file() or p.is_symlink()]
    removed = []
    for path in sorted(owned):
        name = path.relative_to(out).as_posix()
        if name not in listed:
            path.unlink()
            removed.append(name)
    return removed
