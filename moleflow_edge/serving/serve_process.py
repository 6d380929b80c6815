"""`moleflow-edge serve` as a subprocess on free 127.0.0.1 ports: what the tests and benchmarks start,
wait for and always stop, so that each of them runs a real server the same way."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from moleflow_edge.runtime.inference_runtime import ServerLost
from moleflow_edge.serving.client import RemoteRuntime

__all__ = ["ServeProcess", "free_local_ports"]


def free_local_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now (bound together, so all different)."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class ServeProcess:
    """``moleflow-edge serve --export EXPORT ARGS...`` on 127.0.0.1; entering starts it and returns once both
    models answer (RuntimeError with the log's end if it dies or ``timeout_s`` passes), leaving stops it."""

    def __init__(self, export: Path, log: Path, *args: str, timeout_s: float = 180.0) -> None:
        self.export, self.log, self.args, self.timeout_s = export, log, args, timeout_s
        self.http_port, self.grpc_port, self.metrics_port = free_local_ports(3)
        self.process: subprocess.Popen | None = None

    @property
    def http(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc(self) -> str:
        return f"grpc://127.0.0.1:{self.grpc_port}"

    def launch(self) -> subprocess.Popen:
        """Start serve (not waiting for it); its output goes to ``log``."""
        command = [
            sys.executable, "-m", "moleflow_edge.cli", "serve", "--export", str(self.export), "--address", "127.0.0.1",
            "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
            "--metrics-port", str(self.metrics_port), *self.args,
        ]  # fmt: skip
        with open(self.log, "wb") as sink:
            self.process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
        return self.process

    def __enter__(self) -> ServeProcess:
        process = self.launch()
        deadline = time.monotonic() + self.timeout_s
        while process.poll() is None and time.monotonic() < deadline:
            try:
                RemoteRuntime(self.http, retries=0).close()  # the idle connection closed: it would hold a stop 30 s
                return self
            except ServerLost:  # not ready yet
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"moleflow-edge serve did not become ready; its log ends:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> int | None:
        """SIGTERM (a drain), then a kill after 60 s (serve's watchdog then removes what is left); the exit code."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return None if self.process is None else self.process.returncode

    def __exit__(self, *exc: object) -> None:
        self.stop()
