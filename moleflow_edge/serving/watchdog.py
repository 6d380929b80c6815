"""What outlives `serve`: a tiny process that removes tritonserver, its backend stubs, their shared
memory and serve's workspace once serve ends, for any reason, its own SIGKILL included.

`serve` starts it first, in a session of its own (so a Ctrl-C or a kill of serve's process group
does not reach it), holding the write end of its stdin; then marks every process it starts from
then on (tritonserver, which starts the stubs, which start their shared-memory managers) with an
environment variable naming a random token. The watchdog reads stdin: end of file means serve is
gone or done (the kernel closes the pipe when serve dies). Until then it notes, every second, the
/dev/shm segments the marked processes map; at the end it SIGKILLs every process still carrying
the token, unlinks those segments and removes the workspace. Only processes carrying the token
are touched, so other servers on the machine are never harmed.
"""

from __future__ import annotations

import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["MARKER", "Watchdog", "mapped_segments", "marked_processes"]

MARKER = "MOLEFLOW_SERVE_OWNER"  # the environment variable that marks serve's processes
SCAN_PERIOD_S = 1.0  # how often the shared-memory segments of the marked processes are noted
KILL_WAIT_S = 10.0  # how long the sweep waits for SIGKILLed processes to be gone
SHM = Path("/dev/shm")


class Watchdog:
    """The serve side: starts the watchdog process, then marks what serve starts; ``finish`` (after a
    clean stop) lets it sweep what is left and waits for it."""

    def __init__(self) -> None:
        self.token = secrets.token_hex(8)
        # PyTriton's workspace (a copy of tritonserver, the model store, sockets): it makes the folder
        self.workspace = Path(tempfile.gettempdir()) / f"moleflow-serve-{self.token}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moleflow_edge.serving.watchdog", self.token, str(self.workspace)],
            stdin=subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        os.environ[MARKER] = self.token  # inherited by tritonserver and everything it starts

    def finish(self, timeout_s: float = 30.0) -> None:
        os.environ.pop(MARKER, None)
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _environ_has(pid: int, entry: bytes) -> bool:
    try:
        return entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:  # gone, or another user's
        return False


def marked_processes(token: str) -> list[int]:
    """The live processes (not zombies) whose environment carries ``token``, other than this one."""
    entry = f"{MARKER}={token}".encode()
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]
    return [pid for pid in pids if _environ_has(pid, entry)]


def mapped_segments(pids: list[int]) -> set[str]:
    """The /dev/shm files (not yet unlinked) that these processes map."""
    found = set()
    for pid in pids:
        try:
            lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            path = line.split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
            if path.startswith(f"{SHM}/") and not path.endswith("(deleted)"):
                found.add(path)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def sweep(token: str, segments: set[str], workspace: Path) -> str:
    """Kill what carries ``token``, unlink ``segments`` (and those the killed map), remove ``workspace``;
    what was done, in words ('' when nothing was left)."""
    pids = marked_processes(token)
    segments = segments | mapped_segments(pids)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + KILL_WAIT_S
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    removed = [s for s in sorted(segments) if os.path.exists(s)]
    for path in removed:
        Path(path).unlink(missing_ok=True)
    had_workspace = workspace.exists()
    shutil.rmtree(workspace, ignore_errors=True)
    done = [f"killed {len(pids)} leftover processes"] if pids else []
    done += [f"removed {len(removed)} shared-memory segments"] if removed else []
    done += [f"removed {workspace}"] if had_workspace else []
    return ", ".join(done)


def main(token: str, workspace: str) -> None:
    """Wait for end of file on stdin (serve gone or done), noting segments meanwhile; then sweep."""
    segments: set[str] = set()
    while True:
        readable, _, _ = select.select([sys.stdin], [], [], SCAN_PERIOD_S)
        if readable and not os.read(sys.stdin.fileno(), 4096):
            break
        segments |= mapped_segments(marked_processes(token))
    done = sweep(token, segments, Path(workspace))
    if done:
        print(f"serve cleanup: {done}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
