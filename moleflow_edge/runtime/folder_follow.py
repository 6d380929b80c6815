"""`run --source DIR --follow`: image files taken as they appear in a folder, the way many line cameras
deliver frames to an FTP or SMB drop folder (and how the live loop is tested without a camera).

A file is taken once it is completely written, which a reader cannot see directly: here, once its size
and modification time are the same on two polls in a row (POLL_S apart) and it is not empty. A writer
that renames finished files into the folder is seen at once on the next poll; one that writes in place
must not pause longer than a poll in mid-file (FTP and SMB servers' "upload to a temporary name" option
avoids that). Hidden files (".name") are skipped: that is where atomic writers keep their partial
files. Files are taken in arrival order (the poll that found them complete), by name within one poll,
each once; a file written again (another size or time, or deleted and written anew) is a new frame.
Torch-free.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["POLL_S", "follow_folder"]

POLL_S = 0.1  # seconds between two looks at the folder


def _listing(folder: Path, suffixes: frozenset[str]) -> dict[Path, tuple[int, int]]:
    """Image files below ``folder`` (recursively, hidden ones skipped) -> (size, mtime_ns)."""
    found: dict[Path, tuple[int, int]] = {}
    for path in folder.rglob("*"):
        if path.suffix.lower() not in suffixes or any(p.startswith(".") for p in path.relative_to(folder).parts):
            continue
        try:
            st = path.stat()
        except FileNotFoundError:  # removed between the listing and the stat
            continue
        if path.is_file() and st.st_size > 0:
            found[path] = (st.st_size, st.st_mtime_ns)
    return found


def follow_folder(
    folder: Path, suffixes: frozenset[str], sleep: Callable[[float], None] = time.sleep
) -> Iterator[Path | None]:
    """Each completely written image file of ``folder`` once, in arrival order, forever; ``None`` after a
    poll that found nothing new, so that the caller can finish a partial batch or look for a new export
    while the folder is quiet. Memory holds only the files still in the folder."""
    taken: dict[Path, tuple[int, int]] = {}  # path -> the (size, mtime) it had when taken
    previous: dict[Path, tuple[int, int]] = {}
    while True:
        now = _listing(folder, suffixes)
        ready = sorted(p for p, seen in now.items() if previous.get(p) == seen and taken.get(p) != seen)
        taken = {p: seen for p, seen in taken.items() if p in now}  # forget files that left the folder
        for path in ready:
            taken[path] = now[path]
            yield path
        if not ready:
            yield None
        previous = now
        sleep(POLL_S)
