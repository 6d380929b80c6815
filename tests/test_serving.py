"""moleflow-edge serve against a real tritonserver process (PyTriton's bundled binary), on 127.0.0.1.

One server per module, started by the ``server`` fixture as `moleflow-edge serve` in a subprocess on
free ports and always stopped; the drain test, last in this file, stops it with SIGTERM itself.
Every loop is bounded in count, and every wait in time.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from moleflow_edge.cli import app
from moleflow_edge.data.synth import generate
from moleflow_edge.runtime import UNKNOWN, FrameResult, Runtime
from moleflow_edge.serving.libpython import interpreter_libpython, prepare_stub_environment, serving_problem
from moleflow_edge.serving.serve_process import ServeProcess, free_local_ports
from moleflow_edge.serving.server import model_metrics

pytestmark = pytest.mark.skipif(serving_problem() is not None, reason=f"serving unavailable: {serving_problem()}")

REL = 1e-5


@pytest.fixture(scope="module")
def calibrated(built: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared export, calibrated (so frames get decisions), in a folder of this module's own."""
    from moleflow_edge.calibration import calibrate

    export = tmp_path_factory.mktemp("serve") / "export"
    shutil.copytree(built["export_dir"], export)
    calibrate(export, built["data"], 0.1)
    return export


@pytest.fixture(scope="module")
def server(calibrated: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """`moleflow-edge serve` on free 127.0.0.1 ports for this module; stopped (SIGTERM, then kill) at the end."""
    log = tmp_path_factory.mktemp("serve_log") / "server.log"
    args = ("--max-batch", "8", "--max-queue-delay-us", "2000", "--drain-timeout", "300")  # 64 big frames drain
    with ServeProcess(calibrated, log, *args) as process:
        yield process


@pytest.fixture(scope="module")
def frames(built: dict) -> list[np.ndarray]:
    """Normal and defective images of both products, and one of a product the export never learned."""
    data = built["data"]
    files = [f for task in ("weave", "tiles") for f in sorted((data / task / "test").rglob("*.png"))[::5]]
    images = [cv2.imread(str(f)) for f in files]
    images.append(np.full((96, 160, 3), (30, 200, 90), np.uint8))  # neither weave nor tiles, another size
    return images


@pytest.fixture(scope="module")
def local(calibrated: Path, frames: list[np.ndarray]) -> list[FrameResult]:
    with Runtime.load(calibrated) as runtime:
        return [runtime.infer_one(frame) for frame in frames]


def same(got: FrameResult, want: FrameResult) -> bool:
    score_ok = got.image_score == pytest.approx(want.image_score, rel=REL) if want.image_score is not None else (
        got.image_score is None)  # fmt: skip
    distances_ok = all(got.distances[t] == pytest.approx(d, rel=REL) for t, d in want.distances.items())
    return (
        got.error is None and got.task == want.task and score_ok and got.is_anomaly == want.is_anomaly and distances_ok
    )


def test_libpython_folder_goes_first_once(monkeypatch: pytest.MonkeyPatch) -> None:
    libdir = interpreter_libpython().parent  # type: ignore[union-attr]
    monkeypatch.setenv("LD_LIBRARY_PATH", f"/somewhere:{libdir}")
    assert prepare_stub_environment() == libdir
    assert os.environ["LD_LIBRARY_PATH"].split(":") == [str(libdir), "/somewhere"]


def test_eight_concurrent_clients_get_what_the_local_runtime_gives(
    server: ServeProcess, frames: list[np.ndarray], local: list[FrameResult]
) -> None:
    """8 clients x 50 frames (HTTP raw, gRPC raw and HTTP PNG, batches of 1 to 3): frame by frame the
    task, score, decision and distances of Runtime.infer; the server's metrics count every frame."""
    from moleflow_edge.serving import RemoteRuntime

    assert {r.task for r in local} >= {"weave", "tiles", UNKNOWN}
    assert {r.is_anomaly for r in local} >= {True, False}
    kinds = [(server.http, "raw"), (server.grpc, "raw"), (server.http, "png")]

    def client(number: int) -> list[str]:
        address, encoding = kinds[number % len(kinds)]
        wrong = []
        with RemoteRuntime(address, encoding=encoding, retries=2, retry_delay_s=0.5) as remote:
            order = [(number * 7 + k) % len(frames) for k in range(50)]
            size = 1 + number % 3
            for start in range(0, 50, size):
                chunk = order[start : start + size]
                for i, result in zip(
                    chunk, remote.infer([frames[i] for i in chunk], with_maps=number == 0), strict=True
                ):
                    if not same(result, local[i]):
                        wrong.append(f"client {number} frame {i}: {result.summary()} != {local[i].summary()}")
                    if number == 0 and result.anomaly_map is not None:
                        assert result.anomaly_map.shape == local[i].anomaly_map.shape
        return wrong

    with ThreadPoolExecutor(8) as pool:
        wrong = [line for lines in pool.map(client, range(8)) for line in lines]
    assert not wrong, "\n".join(wrong[:5])
    assert urllib.request.urlopen(f"http://{server.http}/v2/health/ready", timeout=10).status == 200
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    counted = [line for line in metrics.splitlines() if line.startswith('nv_inference_count{model="moleflow"')]
    assert counted and float(counted[0].split()[-1]) >= 8 * 50


def test_malformed_requests_get_clear_errors_and_the_server_keeps_serving(
    server: ServeProcess, frames: list[np.ndarray], local: list[FrameResult]
) -> None:
    import tritonclient.http as triton_http
    from tritonclient.utils import InferenceServerException

    from moleflow_edge.serving import RemoteRuntime

    client = triton_http.InferenceServerClient(server.http)

    def send(name: str, data: np.ndarray, datatype: str):  # noqa: ANN202 - a tritonclient result
        tensor = triton_http.InferInput(name, list(data.shape), datatype)
        tensor.set_data_from_numpy(data)
        return client.infer("moleflow", [tensor])

    refused = {
        "wrong dtype": lambda: send("images", np.zeros((1, 32, 32, 3), np.float32), "FP32"),
        "wrong rank": lambda: send("images", np.zeros((1, 32, 32), np.uint8), "UINT8"),
        "empty batch": lambda: send("images", np.zeros((0, 32, 32, 3), np.uint8), "UINT8"),
        "too big a batch": lambda: send("images", np.zeros((9, 32, 32, 3), np.uint8), "UINT8"),
    }
    for what, request in refused.items():
        with pytest.raises(InferenceServerException) as caught:
            request()
        assert caught.value.message(), what
    garbage = send(
        "encoded",
        np.array([[b"\x00not an image"], [cv2.imencode(".png", frames[0])[1].tobytes()]], np.object_),
        "BYTES",
    )
    errors = garbage.as_numpy("error")
    assert b"cannot decode" in errors[0][0] and errors[1][0] == b""
    assert garbage.as_numpy("task")[1][0].decode() == local[0].task
    client.close()
    with RemoteRuntime(server.http) as remote:
        bad, good = remote.infer([np.zeros((4, 4), np.uint8), frames[1]])
        assert "dimensions" in bad.error and same(good, local[1])


def test_a_client_that_disconnects_mid_request_does_not_hurt_the_others(
    server: ServeProcess, frames: list[np.ndarray], local: list[FrameResult]
) -> None:
    """Raw sockets that hang up halfway through a request body, and after sending a whole request
    without reading the answer, while a well-behaved client goes on."""
    from moleflow_edge.serving import RemoteRuntime

    host, port = server.http.split(":")
    body = json.dumps({"inputs": [{"name": "images", "shape": [1, 512, 512, 3], "datatype": "UINT8",
                                   "data": [0] * (512 * 512 * 3)}]}).encode()  # fmt: skip
    stop = threading.Event()

    def rude() -> None:
        for k in range(6):
            connection = http.client.HTTPConnection(host, int(port), timeout=10)
            connection.putrequest("POST", "/v2/models/moleflow/infer")
            connection.putheader("Content-Type", "application/json")
            connection.putheader("Content-Length", str(len(body)))
            connection.endheaders()
            connection.send(body if k % 2 else body[: len(body) // 3])
            connection.close()
            if stop.is_set():
                return

    hanging = threading.Thread(target=rude)
    hanging.start()
    try:
        with RemoteRuntime(server.http) as remote:
            for k in range(20):
                i = k % len(frames)
                assert same(remote.infer_one(frames[i]), local[i]), i
    finally:
        stop.set()
        hanging.join(60)
    with RemoteRuntime(server.http) as remote:
        assert same(remote.infer_one(frames[2]), local[2])


def test_run_server_prints_what_run_export_prints(server: ServeProcess, built: dict, tmp_path: Path) -> None:
    """Without --save (no maps travel) too: every field of run --export's lines, explained_by of the
    unknown frames (a product the export never learned) included."""
    source = tmp_path / "frames"
    for category in ("weave", "tiles"):
        for f in sorted((built["data"] / category / "test").rglob("*.png"))[::6]:
            target = source / category / f.parent.name / f.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, target)
    generate(tmp_path / "other", ["cap"], seed=3, image_size=128, n_train=1, n_test_good=2, n_test_defect=0)
    shutil.copytree(tmp_path / "other" / "cap" / "test" / "good", source / "cap")

    def lines(*where: str) -> list[dict]:
        done = CliRunner().invoke(app, ["run", *where, "--source", str(source), "--batch-size", "3"])
        assert done.exit_code == 0, done.output
        return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]

    here, there = lines("--export", str(server.export)), lines("--server", server.grpc)
    keys = ("source", "task", "score", "anomaly", "threshold", "nearest_task", "explained_by", "distance")
    assert [[line.get(k) for k in keys] for line in here[:-1]] == [[line.get(k) for k in keys] for line in there[:-1]]
    explained = [line["explained_by"] for line in there if line.get("task") == UNKNOWN]
    assert explained and all(explained)  # the cap frames: unknown, and a learned product explains each
    assert len(here) > 5 and here[-1]["summary"]["tasks"] == there[-1]["summary"]["tasks"]
    assert there[-1]["summary"]["backend"].startswith("Triton at grpc://")


def test_run_server_that_is_not_there_is_exit_3_in_one_line(tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    cv2.imwrite(str(image), np.zeros((8, 8, 3), np.uint8))
    (port,) = free_local_ports(1)
    done = CliRunner().invoke(
        app, ["run", "--server", f"127.0.0.1:{port}", "--source", str(image), "--retries", "1", "--retry-delay", "0"]
    )
    assert done.exit_code == 3
    assert "not answering" in done.output and "Traceback" not in done.output


def test_serve_refuses_a_bad_export_in_one_line(tmp_path: Path) -> None:
    done = CliRunner().invoke(app, ["serve", "--export", str(tmp_path / "nothing")])
    assert done.exit_code == 1
    assert done.output.count("\n") == 1 and "manifest.json is missing" in done.output


def pending(metrics_port: int) -> float:
    """Requests Triton has accepted for moleflow and not started yet."""
    return model_metrics("127.0.0.1", metrics_port).get("nv_inference_pending_request_count", 0.0)


def test_sigterm_answers_every_accepted_request_then_exits_0(
    server: ServeProcess, frames: list[np.ndarray], calibrated: Path
) -> None:
    """Last in the file: it stops the module's server. 8 clients each send a full batch of big frames
    with maps; once every request is accepted (queued or done, at most one running), SIGTERM: every
    one of them is answered, and the server exits 0."""
    from moleflow_edge.serving import RemoteRuntime

    big = cv2.resize(frames[0], (1600, 1600))
    with Runtime.load(calibrated) as runtime:
        want = runtime.infer_one(big)  # a 1600 px copy resampled: its own distances, whatever task they give
    clients = [RemoteRuntime(server.http, retries=0, max_map_side=1024) for _ in range(8)]
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(c.infer, [big] * 8) for c in clients]
        deadline = time.monotonic() + 120
        while pending(server.metrics_port) + sum(f.done() for f in futures) < 7:
            assert time.monotonic() < deadline, "the requests were never all accepted"
            time.sleep(0.02)
        server.process.send_signal(signal.SIGTERM)
        results = [r for f in futures for r in f.result(timeout=120)]
    for c in clients:
        c.close()
    assert len(results) == 64 and all(
        r.error is None and r.task == want.task and r.anomaly_map is not None for r in results
    )
    assert server.process.wait(90) == 0
    assert "stopped: every accepted request was answered" in server.log.read_text()
