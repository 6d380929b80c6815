"""One writer per model or export folder: a second `train`, `export` or `calibrate` is refused.

An advisory ``fcntl.flock`` on ``<folder>/.lock`` (Linux, Jetson): the kernel drops it when the
holder exits or is killed, so a crash never leaves a stale lock. The holder's PID is written
into the file so that the refusal can name it. Nothing the lock holder writes may follow a
symlink out of the folder: a symlinked lock file or sub-folder is refused. Torch-free.
"""

from __future__ import annotations

import fcntl
import functools
import inspect
import os
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from moleflow_edge.atomic import OutputError, check_writable, current_umask
from moleflow_edge.errors import UserError

F = TypeVar("F", bound=Callable[..., object])

LOCK_FILE = ".lock"


class FolderLocked(UserError):
    """Another process is writing the same folder (a usage error: the CLI prints it without a traceback)."""


class FolderLock:
    """``with FolderLock(folder, "training"):`` holds the folder's write lock, or raises FolderLocked."""

    def __init__(self, folder: str | Path, activity: str) -> None:
        self.folder = Path(folder)
        self.activity = activity
        self._fd: int | None = None

    def __enter__(self) -> FolderLock:
        check_writable(self.folder, f"{self.activity} folder", directory=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        refuse_symlinked_subfolders(self.folder, self.activity)
        path = self.folder / LOCK_FILE
        try:  # O_NOFOLLOW: a .lock symlinked to another file must not get that file truncated
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666 & ~current_umask())
        except OSError as exc:
            why = "is a symbolic link" if path.is_symlink() else f"cannot be opened ({exc.strerror or exc})"
            raise OutputError(f"{path} {why}: {self.activity} refused; remove it (the toolkit's lock file)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise FolderLocked(
                f"{self.folder} is in use by another moleflow-edge process (pid {holder}); "
                f"{self.activity} refused: run it again when that process has finished"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


def refuse_symlinked_subfolders(folder: Path, activity: str) -> None:
    """Refuse a sub-folder of a model or export folder that is a symlink (detectors/, tasks/, engines/...):
    writes and clean-ups there would land in, or delete from, whatever folder it points to."""
    links = sorted(p.name for p in folder.iterdir() if p.is_symlink() and (p.is_dir() or not p.exists()))
    if links:
        raise OutputError(
            f"{folder}: {', '.join(links)} {'is a symbolic link' if len(links) == 1 else 'are symbolic links'}; "
            f"{activity} refused: the toolkit writes only inside its own folders (replace the link by a real folder)"
        )


def locks_folder(argument: str, activity: str) -> Callable[[F], F]:
    """Decorator: hold ``FolderLock`` on the folder passed as ``argument`` for the whole call, so
    that e.g. two trainings into one model folder cannot interleave (one would train on a shared
    base the other then throws away)."""

    def wrap(function: F) -> F:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def locked(*args: object, **kwargs: object) -> object:
            folder = signature.bind(*args, **kwargs).arguments[argument]
            with FolderLock(folder, activity):  # type: ignore[arg-type]
                return function(*args, **kwargs)

        return locked  # type: ignore[return-value]

    return wrap
