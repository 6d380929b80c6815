"""What `moleflow-edge serve` promises when things go wrong, against a real tritonserver on 127.0.0.1:
readiness only once it can answer, a drain that answers every accepted request (or says how many it
could not), bad requests as per-frame errors, and nothing left behind after its own SIGKILL.

Each server is `moleflow-edge serve` in a subprocess on free ports, always stopped in a finally or
fixture; every loop is bounded in count and time. Processes are identified by ancestry (pid and
start time), never by name, so the servers of other tests on this machine are not touched.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest

from moleflow_edge.serving.libpython import serving_problem
from moleflow_edge.serving.serve_process import ServeProcess

pytestmark = pytest.mark.skipif(serving_problem() is not None, reason=f"serving unavailable: {serving_problem()}")


PENDING = "nv_inference_pending_request_count"


def ready_status(http: str) -> int | None:
    """/v2/health/ready's HTTP status, None when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://{http}/v2/health/ready", timeout=2) as reply:
            return reply.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None
    except Exception:  # noqa: BLE001 - http.client's RemoteDisconnected and the like: nothing answered
        return None


def frame_of(built: dict) -> np.ndarray:
    return cv2.imread(str(min((built["data"] / "weave" / "test").rglob("*.png"))))


@pytest.fixture(scope="module")
def server(built: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServeProcess, dict]]:
    """serve, its readiness polled from the moment it starts; at the first 200, at once, a client
    connects and infers a frame: (the process, {"log": its log then, "result": what the frame got})."""
    from moleflow_edge.serving import RemoteRuntime

    process = ServeProcess(built["export_dir"], tmp_path_factory.mktemp("faults") / "serve.log")
    first_ready: dict = {}
    try:
        process.launch()
        deadline = time.monotonic() + 240
        while process.process.poll() is None and time.monotonic() < deadline and not first_ready:
            if ready_status(process.http) == 200:
                first_ready["log"] = process.log.read_text()
                with RemoteRuntime(process.http, retries=0) as remote:
                    first_ready["result"] = remote.infer_one(frame_of(built))
            time.sleep(0.02)
        assert first_ready, f"serve never became ready; its log ends:\n{process.log.read_text()[-3000:]}"
        yield process, first_ready
    finally:
        process.stop()


def test_ready_only_once_warm_and_answering(server: tuple[ServeProcess, dict]) -> None:
    _, first_ready = server
    result = first_ready["result"]
    assert result.error is None and result.task == "weave" and result.image_score is not None
    assert "warm-up: a frame through the backbone, 2 detectors" in first_ready["log"]


def test_bad_map_side_is_one_line_on_every_frame(server: tuple[ServeProcess, dict], built: dict) -> None:
    import tritonclient.http as triton_http

    process, _ = server
    client = triton_http.InferenceServerClient(process.http)
    frames = np.stack([cv2.resize(frame_of(built), (64, 48))] * 2)
    try:

        def send(side: object) -> triton_http.InferResult:
            tensor = triton_http.InferInput("images", list(frames.shape), "UINT8")
            tensor.set_data_from_numpy(frames)
            return client.infer("moleflow", [tensor], parameters={"map_side": side})

        for side in ("big", -5, 1e9, 2.5, True):
            errors = [e[0].decode() for e in send(side).as_numpy("error")]
            assert len(errors) == 2 and all("map_side must be a whole number" in e for e in errors), side
            assert all("\n" not in e and "Traceback" not in e for e in errors), errors
        capped = send(10**9)  # a whole number beyond the cap is capped (--map-size), as documented
        assert not capped.as_numpy("error")[0][0] and tuple(capped.as_numpy("map_shape")[0]) == (48, 64)
    finally:
        client.close()


def test_zero_sized_raw_frame_is_refused_and_serve_keeps_serving(
    server: tuple[ServeProcess, dict], built: dict
) -> None:
    """A raw frame with a zero-length side gets the one-line per-frame error `run` gives (the model in
    front of PyTriton answers it: PyTriton's stub cannot carry it), as does every frame of its request;
    a good frame in a request of the same batch, and one sent next, are answered."""
    import tritonclient.http as triton_http

    process, _ = server
    client = triton_http.InferenceServerClient(process.http, network_timeout=60, concurrency=3)
    good = frame_of(built)[None]

    def request(frames: np.ndarray, **parameters: object) -> triton_http.InferAsyncRequest:
        tensor = triton_http.InferInput("images", list(frames.shape), "UINT8")
        tensor.set_data_from_numpy(frames)
        return client.async_infer("moleflow", [tensor], parameters=parameters or None)

    try:
        answers = [request(np.zeros(shape, np.uint8)) for shape in ((1, 0, 0, 3), (2, 5, 0, 3))]
        answers.append(request(good, map_side=32))  # with the bad ones, so likely in their batch
        for answer, shape in zip(answers[:2], ((0, 0, 3), (5, 0, 3)), strict=True):
            errors = [e[0].decode() for e in answer.get_result(timeout=60).as_numpy("error")]
            assert errors == [f"frame is empty (shape {shape}), expected uint8 BGR HxWx3"] * len(errors), errors
        mapped = answers[2].get_result(timeout=60)
        assert not mapped.as_numpy("error")[0][0] and mapped.as_numpy("task")[0][0] == b"weave"
        assert mapped.as_numpy("map_shape")[0].max() == 32  # the request's parameters got through the guard
        after = request(good).get_result(timeout=60)
        assert not after.as_numpy("error")[0][0] and after.as_numpy("map_shape")[0].max() == 0
    finally:
        client.close()
    assert "Traceback" not in process.log.read_text()


def test_sigterm_drains_two_busy_clients_and_exits_0(server: tuple[ServeProcess, dict], built: dict) -> None:
    """Last for the module's server. Two clients send frames in a loop (at most 400 each, 120 s); on
    SIGTERM readiness drops and never comes back, every request sent before it dropped is answered,
    later ones are refused, and serve exits 0 saying how many it answered."""
    from moleflow_edge.serving import RemoteRuntime

    process, _ = server
    frame = frame_of(built)
    sent: list[list[tuple[float, bool]]] = [[], []]  # per client: (when sent, answered)
    stop = threading.Event()

    def client(number: int) -> None:
        with RemoteRuntime(process.http, retries=0) as remote:
            deadline = time.monotonic() + 120
            for _ in range(400):
                if stop.is_set() or time.monotonic() > deadline:
                    return
                when = time.monotonic()
                try:
                    answered = remote.infer_one(frame).error is None
                except Exception:  # noqa: BLE001 - refused or cut: either way not answered, and the client stops
                    answered = False
                sent[number].append((when, answered))
                if not answered:
                    return

    threads = [threading.Thread(target=client, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 60
        while min(len(s) for s in sent) < 5:
            assert time.monotonic() < deadline, "the clients never got going"
            time.sleep(0.05)
        process.process.send_signal(signal.SIGTERM)
        last_ready, statuses = time.monotonic(), []
        deadline = time.monotonic() + 90
        while process.process.poll() is None and time.monotonic() < deadline:
            status = ready_status(process.http)
            if status == 200 and not any(s != 200 for s in statuses):
                last_ready = time.monotonic()
            statuses.append(status)
            time.sleep(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    dropped = [k for k, s in enumerate(statuses) if s != 200]
    assert dropped and all(s != 200 for s in statuses[dropped[0] :]), "readiness came back after it dropped"
    before = [answered for requests in sent for when, answered in requests if when < last_ready]
    assert len(before) >= 10 and all(before), f"{before.count(False)} requests sent while ready were not answered"
    assert process.process.wait(30) == 0
    log = process.log.read_text()
    answered = int(re.search(r"stopped: every accepted request was answered \((\d+)\)", log).group(1))
    assert answered >= sum(a for requests in sent for _, a in requests)
    assert "Signal (11)" not in log and "Exit timeout expired" not in log


def test_a_drain_timeout_that_passes_says_how_many_were_not_answered(built: dict, tmp_path: Path) -> None:
    """4 clients each send a full batch of big frames with maps (one batch runs at a time); once (nearly)
    all are accepted, SIGTERM with a 0.05 s drain timeout: serve exits 6 naming how many accepted requests
    were not answered: at least one, at most as many as clients were cut off (a request that came after
    the SIGTERM is refused, not accepted; a batch on its way from Triton to serve is seen by neither)."""
    from moleflow_edge.exit_codes import EXIT_UNANSWERED
    from moleflow_edge.serving import RemoteRuntime
    from moleflow_edge.serving.server import model_metrics

    big = cv2.resize(frame_of(built), (1600, 1600))
    with ServeProcess(built["export_dir"], tmp_path / "serve.log", "--drain-timeout", "0.05") as process:
        clients = [RemoteRuntime(process.http, retries=0, max_map_side=1024) for _ in range(4)]

        def send(remote: RemoteRuntime) -> str:
            try:
                return "answered" if all(r.error is None for r in remote.infer([big] * 8)) else "frame errors"
            except Exception as exc:  # noqa: BLE001 - refused (never accepted) or cut by the stop (not answered)
                return "refused" if "no available versions" in str(exc) else "cut"

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(send, c) for c in clients]
            deadline = time.monotonic() + 120
            while model_metrics("127.0.0.1", process.metrics_port).get(PENDING, 0) + sum(f.done() for f in futures) < 3:
                assert time.monotonic() < deadline, "the requests were never all accepted"
                time.sleep(0.02)
            process.process.send_signal(signal.SIGTERM)
            answered = [f.result(timeout=120) for f in futures]
        for c in clients:
            c.close()
        assert process.process.wait(60) == EXIT_UNANSWERED
    said = re.search(
        r"error: (\d+) accepted requests were not answered within the drain timeout", process.log.read_text()
    )
    assert said and 1 <= int(said.group(1)) <= answered.count("cut"), answered


def _processes() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, state, start time) of every process now."""
    found = {}
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        found[int(name)] = (int(fields[1]), fields[0], fields[19])
    return found


def _descendants(root: int) -> dict[int, str]:
    """pid -> start time of every live descendant of ``root``."""
    table, found, todo = _processes(), {}, [root]
    while todo:
        parent = todo.pop()
        for pid, (ppid, _, started) in table.items():
            if ppid == parent and pid not in found:
                found[pid] = started
                todo.append(pid)
    return found


def test_serve_killed_9_leaves_no_process_segment_or_workspace(built: dict, tmp_path: Path) -> None:
    from moleflow_edge.serving import RemoteRuntime

    with ServeProcess(built["export_dir"], tmp_path / "serve.log") as process:
        with RemoteRuntime(process.http, retries=0) as remote:
            assert remote.infer_one(frame_of(built)).error is None  # the data path's shared memory in use
        children = _descendants(process.process.pid)
        commands = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode() for pid in children}
        assert any("tritonserver/bin/tritonserver" in c for c in commands.values())
        assert any("triton_python_backend_stub" in c for c in commands.values())
        segments = set()
        for pid in children:
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                if "/dev/shm/" in line and not line.endswith("(deleted)"):
                    segments.add(line[line.index("/dev/shm/") :])
        workspace = Path(re.search(r"--model-repository (\S+)/model-store", " ".join(commands.values())).group(1))
        assert segments and workspace.is_dir()
        process.process.kill()
        process.process.wait(10)

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            table = _processes()
            alive = [
                p for p, started in children.items() if p in table and table[p][2] == started and table[p][1] != "Z"
            ]
            left = [s for s in segments if os.path.exists(s)]
            if not alive and not left and not workspace.exists():
                break
            time.sleep(0.2)
        assert not alive, f"survivors: {[commands[p][:100] for p in alive]}"
        assert not left and not workspace.exists(), (left, workspace)
    assert "serve cleanup: killed" in process.log.read_text()
