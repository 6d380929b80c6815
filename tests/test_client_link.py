"""run --server when the link to the server fails: the client never hangs, ends with exit 3 within its
deadlines (LinkOptions) and says in one line which server was lost and why, never with a traceback.

Real servers: `moleflow-edge serve` (tritonserver) on free 127.0.0.1 ports, killed -9, its tritonserver
killed, or frozen (SIGSTOP) under an HTTP and a gRPC client mid-stream; and plain sockets on 127.0.0.1
that hang up on every connection or accept and say nothing. Every process a test starts is killed by
its id in a finally; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from moleflow_edge.runtime.options import LinkOptions
from moleflow_edge.serving.libpython import serving_problem
from moleflow_edge.serving.serve_process import ServeProcess

pytest.importorskip("tritonclient", reason="run --server needs the [serve] extra")

# the clients' link: short deadlines, so that a lost server ends them in seconds
LINK = LinkOptions(connect_timeout_s=2.0, timeout_s=4.0, retries=2, retry_delay_s=0.5)
LINK_ARGS = [
    "--connect-timeout", str(LINK.connect_timeout_s), "--timeout", str(LINK.timeout_s),
    "--retries", str(LINK.retries), "--retry-delay", str(LINK.retry_delay_s),
]  # fmt: skip
MARGIN_S = 30  # a client's start-up and summary on a busy two-core machine


def run_server_command(address: str, source: Path) -> list[str]:
    return [sys.executable, "-m", "moleflow_edge.cli", "run", "--server", address, "--source", str(source), *LINK_ARGS]


def check_lost_line(stderr: str, address: str) -> str:
    """The one error line of a client that lost ``address`` (it names the server); returned for its cause."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    server = address if "://" in address else f"http://{address}"
    assert f"the inference server at {server} is not answering (" in errors[0], errors[0]
    return errors[0]


# --- sockets that accept and then fail the client: no tritonserver needed -------------------------
@contextmanager
def misbehaving_listener(hang_up: bool) -> Iterator[int]:
    """A TCP listener on a free 127.0.0.1 port that closes every connection at once (``hang_up``) or holds
    it open without a word; at most 50 connections, stopped (its connections closed) on leaving."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    held: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        for _ in range(50):
            while not stop.is_set():
                try:
                    connection, _ = listener.accept()
                    break
                except TimeoutError:
                    continue
            else:
                return
            if hang_up:
                connection.close()
            else:
                held.append(connection)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(10)
        for connection in held:
            connection.close()
        listener.close()


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("hang_up", [True, False], ids=["hangs-up", "says-nothing"])
def test_a_server_that_hangs_up_or_says_nothing_is_exit_3_in_one_line(
    protocol: str, hang_up: bool, tmp_path: Path
) -> None:
    import cv2
    import numpy as np

    image = tmp_path / "a.png"
    cv2.imwrite(str(image), np.zeros((8, 8, 3), np.uint8))
    with misbehaving_listener(hang_up) as port:
        address = f"127.0.0.1:{port}" if protocol == "http" else f"grpc://127.0.0.1:{port}"
        command = run_server_command(address, image)
        done = subprocess.run(
            command, check=False, capture_output=True, text=True, timeout=LINK.longest_wait_s + MARGIN_S
        )
    assert done.returncode == 3, done.stderr
    line = check_lost_line(done.stderr, address)
    if not hang_up:  # the deadline ended each try
        assert ("DEADLINE_EXCEEDED" if protocol == "grpc" else "timed out") in line, line
    assert f"tried {LINK.retries + 1} times" in line


# --- a real server lost under real clients, mid-stream ---------------------------------------------
def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` now (tritonserver, its backend stubs, PyTriton's workers), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):  # it ended meanwhile
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def command_name(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "comm").read_text().strip()
    except OSError:
        return ""


def signal_each(pids: list[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def lines_in(path: Path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


@pytest.mark.slow
@pytest.mark.skipif(serving_problem() is not None, reason=f"serving unavailable: {serving_problem()}")
@pytest.mark.parametrize("loss", ["serve killed", "tritonserver killed", "frozen"])
def test_a_server_lost_mid_stream_ends_http_and_grpc_clients_with_exit_3(
    loss: str, built: dict, tmp_path: Path
) -> None:
    """An HTTP and a gRPC client run a long folder through serve; once both print frames, serve is
    killed -9 (its tritonserver orphaned: it keeps the port and answers nothing useful), or its
    tritonserver is killed, or the whole server is frozen (it accepts and never answers). Both
    clients end with exit 3 within their deadlines, one line naming the server, and a summary."""
    source = tmp_path / "frames"
    source.mkdir()
    first = min((built["data"] / "weave" / "test" / "good").glob("*.png"))
    for k in range(3000):  # hard links: a long stream at no cost
        os.link(first, source / f"{k:05d}.png")
    clients: list[subprocess.Popen] = []
    server_tree: list[int] = []
    with ServeProcess(built["export_dir"], tmp_path / "serve.log") as server:
        try:
            addresses = [server.http, server.grpc]
            for k, address in enumerate(addresses):
                with open(tmp_path / f"out{k}.txt", "w") as out, open(tmp_path / f"err{k}.txt", "w") as err:
                    clients.append(subprocess.Popen(run_server_command(address, source), stdout=out, stderr=err))
            deadline = time.monotonic() + 120
            while min(lines_in(tmp_path / f"out{k}.txt") for k in range(2)) < 3:
                assert time.monotonic() < deadline and all(c.poll() is None for c in clients), "the clients never ran"
                time.sleep(0.1)
            server_tree = descendants(server.process.pid)
            triton = [pid for pid in server_tree if command_name(pid) == "tritonserver"]
            assert triton, server_tree
            if loss == "serve killed":
                server.process.kill()
            elif loss == "tritonserver killed":
                signal_each(triton, signal.SIGKILL)
            else:
                signal_each([server.process.pid, *server_tree], signal.SIGSTOP)
            lost_at = time.monotonic()
            codes = [c.wait(LINK.longest_wait_s + MARGIN_S - (time.monotonic() - lost_at)) for c in clients]
        finally:
            signal_each([c.pid for c in clients if c.poll() is None], signal.SIGKILL)
            signal_each([*server_tree, server.process.pid], signal.SIGKILL)  # a stopped process dies too
            server.process.wait(30)
    for k, (address, code) in enumerate(zip(addresses, codes, strict=True)):
        stderr = (tmp_path / f"err{k}.txt").read_text()
        assert code == 3, stderr
        line = check_lost_line(stderr, address)
        if loss == "frozen":
            assert ("DEADLINE_EXCEEDED" if address.startswith("grpc") else "timed out") in line, line
        lines = [json.loads(row) for row in (tmp_path / f"out{k}.txt").read_text().splitlines()]
        assert lines[-1]["summary"]["outcome"] == "lost" and lines[-1]["summary"]["processed"] >= 3
        assert all("task" in row for row in lines[:-1])  # the frames answered before the loss
