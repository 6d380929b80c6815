"""Atomic file writes and output checks: a reader (or a crash) never sees half a file. Torch-free."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from moleflow_edge.errors import UserError


class OutputError(UserError):
    """An output path that cannot be written; found before any work starts."""


def current_umask() -> int:
    """The process umask (os.umask can only be read by setting it, so it is set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


TEMP_SUFFIX = ".tmp"  # write_atomic's temporary files are ".<name>.<random>.tmp" beside their target


def write_atomic(path: Path, write: Callable[[Path], object], mode: int | None = None) -> None:
    """Write through a temporary file in the same folder, then rename it into place.

    The file gets ``mode``, by default the mode an ordinary write would (0666 less the umask),
    not mkstemp's 0600, so that a model or export written by one user can be read by the
    service that runs it (private keys pass 0600). The mode is set again after ``write``,
    which may have replaced the file (safetensors does). The data is flushed before the rename.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = 0o666 & ~current_umask() if mode is None else mode
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    os.fchmod(fd, mode)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


def sweep_stale_temps(folder: Path) -> list[str]:
    """Remove write_atomic's temporary files that a killed write left in ``folder`` (not below it);
    only regular files, never through a symlink. The caller holds the folder's write lock, so no
    live write can own one. Returns the names removed."""
    if not folder.is_dir() or folder.is_symlink():
        return []
    removed = []
    for path in folder.iterdir():
        if path.name.startswith(".") and path.name.endswith(TEMP_SUFFIX) and path.is_file() and not path.is_symlink():
            path.unlink()
            removed.append(path.name)
    return removed


def check_writable(path: str | Path, option: str, *, directory: bool) -> None:
    """Refuse an output path that cannot be written, before hours of work are spent on it.

    ``directory``: the path is a folder to create or fill (else a file to write). Writes and
    removes a probe file in the folder that will hold the output (the nearest existing one when
    the folder does not exist yet), so permissions, read-only mounts and a file in the way are
    all found; nothing is left behind.
    """
    path = Path(path)
    if path.exists() and directory != path.is_dir():
        want = "a folder" if directory else "a file"
        raise OutputError(f"{option} {path}: exists and is not {want}")
    if not directory and path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"{option} {path}: the file is not writable")
    folder = path if directory else path.parent
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == folder else f", so {folder} cannot be created"
        raise OutputError(f"{option} {path}: {existing} is a file, not a folder{where}")
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".moleflow-probe-"):
            pass
    except OSError as exc:
        raise OutputError(f"{option} {path}: cannot write in {existing} ({exc.strerror or exc})") from exc


RENAME_EXCHANGE = 2  # linux/fs.h: renameat2 swaps the two paths in one step
AT_FDCWD = -100


def replace_folder(new: Path, target: Path) -> None:
    """Put the complete folder ``new`` at ``target`` in one atomic step, then remove the folder it
    replaced: Linux's renameat2(RENAME_EXCHANGE) swaps the two (a rename when ``target`` does not exist),
    so a kill at any moment leaves the old folder or the new one at ``target``, never neither, and a
    reader sees one whole. OSError, naming both, where the file system cannot swap folders."""
    import ctypes
    import shutil

    if not target.exists():
        os.rename(new, target)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(AT_FDCWD, os.fsencode(new), AT_FDCWD, os.fsencode(target), RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"cannot swap {new} and {target} in one step: {os.strerror(code)}")
    shutil.rmtree(new)  # now the replaced folder
