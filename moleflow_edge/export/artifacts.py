"""What an export run hands back: the file-by-file report, the error, and the source hash.

Every graph and engine records the hash of what it was made from (``source_hash`` of weights and
options); the exporter reuses a file only while that hash and the file's own are unchanged.
Torch-free, so that the graph exporter, the staging commit and the TensorRT engine builder
share it without importing one another.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moleflow_edge.contract import Manifest
from moleflow_edge.errors import UserError


class ExportError(UserError):
    """An export that cannot be made as asked; the message names the argument or file at fault."""


@dataclass(frozen=True)
class ExportedFile:
    """One artifact of an export run: its size, the seconds spent on it, and whether it was reused."""

    file: str
    bytes: int
    seconds: float
    skipped: bool


@dataclass
class ExportReport:
    """What an export run wrote (or found up to date) and what it removed."""

    out_dir: Path
    manifest: Manifest
    files: list[ExportedFile] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    rebuilt: list[str] = field(default_factory=list)  # files that no longer matched their sha256 or name
    notes: list[str] = field(default_factory=list)  # what the run decided about the folder as a whole

    @property
    def written(self) -> list[ExportedFile]:
        return [f for f in self.files if not f.skipped]

    def table(self) -> str:
        """One line per file: what the CLI prints."""
        lines = [f"{'file':<40} {'MiB':>8} {'s':>7}  status"]
        for f in self.files:
            status = "up to date" if f.skipped else "written"
            lines.append(f"{f.file:<40} {f.bytes / 2**20:>8.2f} {f.seconds:>7.1f}  {status}")
        lines += [f"{name:<40} {'':>8} {'':>7}  removed" for name in self.removed]
        lines += [f"warning: {name} did not match its sha256 in the manifest or its content-addressed name "
                  "(changed, swapped or missing): rebuilt from the model, not reused"
                  for name in self.rebuilt]  # fmt: skip
        return "\n".join(lines + [f"note: {note}" for note in self.notes])


def source_hash(*parts: object) -> str:
    """sha256 over bytes, str, numpy arrays and JSON-able values, in order."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, bytes):
            data = part
        elif isinstance(part, np.ndarray):
            data = np.ascontiguousarray(part).tobytes() + str((part.dtype, part.shape)).encode()
        else:
            data = json.dumps(part, sort_keys=True).encode()
        digest.update(hashlib.sha256(data).digest())
    return digest.hexdigest()
