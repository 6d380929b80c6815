"""export --format triton: every config.pbtxt parses as Triton's ModelConfig, and the repository's Python-backend
models run in a real tritonserver (PyTriton's bundled binary, started here on free 127.0.0.1 ports).

The bundled server has the Python backend but not the onnxruntime one, so for the serving test the ONNX
models get Python-backend configs whose model.py runs the same model.onnx with onnxruntime; the BLS model
``moleflow``, the info model and the client are the repository's own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import pytest

from moleflow_edge.errors import UserError
from moleflow_edge.router import UNKNOWN
from moleflow_edge.runtime import Runtime
from moleflow_edge.serving.libpython import prepare_stub_environment, serving_problem
from moleflow_edge.serving.serve_process import free_local_ports
from tests.export_fixture import TASKS

pytestmark = pytest.mark.skipif(serving_problem() is not None, reason=f"serving unavailable: {serving_problem()}")

ONNX_AS_PYTHON = """
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.session = ort.InferenceSession(args["model_repository"] + "/1/model.onnx", providers=["CPUExecutionProvider"])

    def execute(self, requests):
        names = [o.name for o in self.session.get_outputs()]
        replies = []
        for request in requests:
            feed = {i.name: pb_utils.get_input_tensor_by_name(request, i.name).as_numpy() for i in self.session.get_inputs()}
            outputs = self.session.run(names, feed)
            replies.append(pb_utils.InferenceResponse([pb_utils.Tensor(n, o) for n, o in zip(names, outputs)]))
        return replies
"""


@pytest.fixture(scope="module")
def repository(built: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(export, repository): a calibrated copy of the shared export and its Triton repository."""
    from moleflow_edge.calibration import calibrate
    from moleflow_edge.serving.triton.decisions import RepositoryOptions
    from moleflow_edge.serving.triton.repository import write_triton_repository

    base = tmp_path_factory.mktemp("triton")
    export = base / "export"
    shutil.copytree(built["export_dir"], export)
    calibrate(export, built["data"], 0.1)
    write_triton_repository(export, base / "repo", RepositoryOptions(max_batch=4))
    return export, base / "repo"


def parse(path: Path):  # noqa: ANN201 - a ModelConfig message
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_every_config_parses_and_names_its_model(repository: tuple[Path, Path]) -> None:
    from moleflow_edge.contract import load_manifest

    export, repo = repository
    manifest = load_manifest(export)
    configs = {p.parent.name: parse(p) for p in repo.glob("*/config.pbtxt")}
    tasks = [f"moleflow_task_{t}" for t in manifest.task_names]
    assert set(configs) == {"moleflow", "moleflow_info", "moleflow_backbone", *tasks}
    for name, config in configs.items():
        assert config.name == name and (config.platform == "onnxruntime_onnx") == (
            name not in ("moleflow", "moleflow_info")
        )
        assert len(config.instance_group) == 1
    assert configs["moleflow"].backend == "python" and configs["moleflow"].max_batch_size == 4
    assert configs["moleflow"].dynamic_batching.max_queue_delay_microseconds == 2000
    assert [i.optional for i in configs["moleflow"].input] == [True, True]
    backbone = configs["moleflow_backbone"]
    assert list(backbone.input[0].dims) == [manifest.image_size, manifest.image_size, 3]
    assert [o.name for o in backbone.output] == ["embedding", "routing_feature"]
    image_score = configs[tasks[0]].output[1]
    assert image_score.name == "image_score" and list(image_score.dims) == [1] and image_score.HasField("reshape")
    graph = export / manifest.backbone_graphs["fp32"].file
    assert (repo / "moleflow_backbone" / "1" / "model.onnx").read_bytes() == graph.read_bytes()


def python_stand_ins(repo: Path) -> None:
    """The repository's ONNX models as Python-backend models running the same model.onnx (the bundled
    server has no onnxruntime backend)."""
    from google.protobuf import text_format

    for folder in [repo / "moleflow_backbone", *repo.glob("moleflow_task_*")]:
        config = parse(folder / "config.pbtxt")
        config.ClearField("platform")
        config.backend = "python"
        (folder / "config.pbtxt").write_text(text_format.MessageToString(config))
        (folder / "1" / "model.py").write_text(ONNX_AS_PYTHON)


@contextmanager
def tritonserver(repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *options: str) -> Iterator[int]:
    """PyTriton's bundled tritonserver on ``repo``, on free 127.0.0.1 ports, ready: its HTTP port; stopped after."""
    import pytriton
    import tritonclient.http as triton_http
    from tritonclient.utils import InferenceServerException

    monkeypatch.setenv("LD_LIBRARY_PATH", os.environ.get("LD_LIBRARY_PATH", ""))  # restored after the test
    prepare_stub_environment()
    bundled = Path(pytriton.__file__).parent / "tritonserver"
    server = tmp_path / "tritonserver"
    shutil.copytree(bundled, server, ignore=shutil.ignore_patterns("python_backend_stubs"))
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    shutil.copy(
        bundled / "python_backend_stubs" / version / "triton_python_backend_stub", server / "backends" / "python"
    )
    libs = Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs"
    env = {
        **os.environ,
        "LD_LIBRARY_PATH": f"{os.environ['LD_LIBRARY_PATH']}:{libs}",
        "OMP_NUM_THREADS": "1",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }  # the stub's Python is this venv's
    http, grpc, metrics = free_local_ports(3)
    command = [
        str(server / "bin" / "tritonserver"), "--model-repository", str(repo), "--backend-directory", str(server / "backends"),
        "--http-address", "127.0.0.1", "--grpc-address", "127.0.0.1", "--metrics-address", "127.0.0.1",
        "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--exit-timeout-secs", "5",
        *options,
    ]  # fmt: skip
    log = tmp_path / "tritonserver.log"
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        client = triton_http.InferenceServerClient(f"127.0.0.1:{http}")
        deadline = time.monotonic() + 180
        while process.poll() is None and time.monotonic() < deadline:
            try:
                if client.is_server_ready():
                    break
            except (OSError, InferenceServerException):  # not listening yet
                pass
            time.sleep(0.5)
        client.close()
        assert process.poll() is None, f"tritonserver exited; its log ends:\n{log.read_text()[-3000:]}"
        yield http
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def run_printed_loads(output: str, http: int) -> list[str]:
    """Run the curl lines a command printed for a Triton at 127.0.0.1:``http``, as printed; the models loaded."""
    from moleflow_edge.serving.triton.decisions import TRITON_URL

    loads = [line for line in output.splitlines() if line.startswith("curl ")]
    for line in loads:
        subprocess.run(line.replace(TRITON_URL, f"127.0.0.1:{http}").split(), check=True, timeout=120)
    return [line.rsplit("/", 2)[-2] for line in loads]


def test_the_repository_serves_what_the_runtime_gives(
    repository: tuple[Path, Path], built: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moleflow_edge.serving import RemoteRuntime

    export, source = repository
    repo = tmp_path / "repo"
    shutil.copytree(source, repo)
    python_stand_ins(repo)
    with tritonserver(repo, tmp_path, monkeypatch) as http:
        files = [f for task in ("weave", "tiles") for f in sorted((built["data"] / task / "test").rglob("*.png"))[::7]]
        frames = [cv2.imread(str(f)) for f in files] + [np.full((96, 160, 3), (30, 200, 90), np.uint8)]
        with Runtime.load(export) as runtime:
            want = runtime.infer(frames)
        with RemoteRuntime(f"127.0.0.1:{http}", retries=0, max_map_side=256) as remote:
            assert remote.tasks == runtime.tasks and remote.description.endswith(
                "Triton model repository, fp32, frames sent raw)"
            )
            got = remote.infer(frames)
        assert want[-1].task == UNKNOWN and want[-1].explained_by is not None  # the green frame: no product
        for g, w in zip(got, want, strict=True):
            assert g.error is None and g.task == w.task and g.is_anomaly == w.is_anomaly
            assert (
                g.image_score == pytest.approx(w.image_score, rel=1e-5)
                if w.image_score is not None
                else g.image_score is None
            )
            assert all(g.distances[t] == pytest.approx(d, rel=1e-5) for t, d in w.distances.items())
            assert g.explained_by == w.explained_by  # an unknown frame's map: the task that explains it best
            assert g.anomaly_map.shape == w.anomaly_map.shape
            assert np.allclose(g.anomaly_map, w.anomaly_map, rtol=1e-4, atol=1e-4)


def test_calibrate_after_export_format_triton_changes_the_served_thresholds(
    built: dict, export_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`export --format triton`, a tritonserver serving EXPORT/triton, then `calibrate`: once the server
    loads the models `calibrate` prints it serves the calibrated thresholds (it served none before)."""
    from typer.testing import CliRunner

    from moleflow_edge.cli import app
    from moleflow_edge.contract import load_manifest
    from moleflow_edge.serving import RemoteRuntime

    exported = CliRunner().invoke(
        app, ["export", "--model", str(built["model_dir"]), "--all", "--out", str(export_copy), "--format", "triton"]
    )
    assert exported.exit_code == 0, exported.output
    repo = export_copy / "triton"
    python_stand_ins(repo)  # the graphs stay the export's: calibrate checks them before refreshing
    frames = [cv2.imread(str(min((built["data"] / t / "test" / "good").glob("*.png")))) for t in TASKS]

    def served() -> list[tuple[str | None, float | None]]:
        with RemoteRuntime(f"127.0.0.1:{http}", retries=0) as remote:
            return [(r.task, r.threshold) for r in remote.infer(frames, with_maps=False)]

    with tritonserver(repo, tmp_path, monkeypatch, "--model-control-mode", "explicit", "--load-model", "*") as http:
        assert served() == [(t, None) for t in TASKS]  # uncalibrated: no threshold, no decision
        calibrated = CliRunner().invoke(
            app, ["calibrate", "--export", str(export_copy), "--data", str(built["data"]), "--target-fpr", "0.1"]
        )
        assert calibrated.exit_code == 0, calibrated.output
        assert run_printed_loads(calibrated.output, http) == ["moleflow_info", "moleflow"]  # no graph changed
        thresholds = load_manifest(export_copy).task
        assert served() == [(t, thresholds(t).thresholds["fp32"]) for t in TASKS]


def test_a_repository_with_other_graphs_is_not_refreshed(repository: tuple[Path, Path], tmp_path: Path) -> None:
    from moleflow_edge.serving.triton.decisions import refresh_triton_repository

    export, source = repository
    copy = tmp_path / "export"
    shutil.copytree(export, copy)
    shutil.copytree(source, copy / "triton")
    assert refresh_triton_repository(copy) == copy / "triton"
    graph = copy / "triton" / "moleflow_task_weave" / "1" / "model.onnx"
    graph.write_bytes(graph.read_bytes() + b"\0")  # as if written from another export of the task
    before = (copy / "triton" / "moleflow" / "1" / "manifest.json").read_bytes()
    with pytest.raises(UserError, match="moleflow_task_weave.*export --format triton"):
        refresh_triton_repository(copy)
    assert (copy / "triton" / "moleflow" / "1" / "manifest.json").read_bytes() == before


def test_the_repository_is_written_under_the_export_lock_and_swapped_in_whole(
    repository: tuple[Path, Path], tmp_path: Path
) -> None:
    """While another process holds the export's lock, no repository is written; a staging folder a killed
    run left is swept by the next run, which replaces the repository whole (its new options everywhere)."""
    from moleflow_edge.locking import FolderLock, FolderLocked
    from moleflow_edge.serving.triton.decisions import RepositoryOptions, read_options
    from moleflow_edge.serving.triton.repository import write_triton_repository

    export, _ = repository
    copy = tmp_path / "export"
    shutil.copytree(export, copy)
    with FolderLock(copy, "calibration"), pytest.raises(FolderLocked, match="in use by another"):
        write_triton_repository(copy, None, RepositoryOptions(max_batch=2))
    assert not (copy / "triton").exists()
    write_triton_repository(copy, None, RepositoryOptions(max_batch=2))
    killed = copy / ".triton.staging-0123456789ab" / "moleflow"
    killed.mkdir(parents=True)  # as a run killed midway leaves it
    (copy / "triton" / "moleflow_task_old").mkdir()  # a model the new repository does not have
    write_triton_repository(copy, None, RepositoryOptions(max_batch=3))
    assert read_options(copy / "triton").max_batch == 3
    assert {parse(p).max_batch_size for p in (copy / "triton").glob("*/config.pbtxt")} == {0, 3}  # info: 0
    assert not (copy / "triton" / "moleflow_task_old").exists()
    assert not list(copy.glob(".triton.staging-*"))


def test_replace_folder_swaps_a_folder_in_one_step(tmp_path: Path) -> None:
    from moleflow_edge.atomic import replace_folder

    old, new = tmp_path / "repo", tmp_path / ".repo.new"
    (old / "a").mkdir(parents=True)
    (new / "b").mkdir(parents=True)
    replace_folder(new, old)
    assert [p.name for p in old.iterdir()] == ["b"] and not new.exists()
    (new / "c").mkdir(parents=True)
    replace_folder(new, tmp_path / "fresh")  # nothing there yet: a rename
    assert [p.name for p in (tmp_path / "fresh").iterdir()] == ["c"]


def test_a_running_triton_picks_up_a_new_task_by_the_printed_load_requests(
    built: dict, synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tritonserver (explicit model control) serving a 2-task `export --format triton`; an incremental
    export adds a third product; the load requests that export prints, run as printed (curl), make the
    same server score the new product as itself, and a client streaming frames all along gets every one
    answered, first by the old export, then by the new one."""
    from typer.testing import CliRunner

    from moleflow_edge.cli import app
    from moleflow_edge.config import DetectorKind
    from moleflow_edge.serving import RemoteRuntime
    from moleflow_edge.train import train_task
    from tests.conftest import TINY_CONFIG

    model, export, new = tmp_path / "model", tmp_path / "export", "screw"
    shutil.copytree(built["model_dir"], model)
    exported = CliRunner().invoke(
        app, ["export", "--model", str(model), "--all", "--out", str(export), "--format", "triton"]
    )
    assert exported.exit_code == 0, exported.output
    train_task(synth_root, new, model, TINY_CONFIG, progress=False, detector=DetectorKind.MEMORY)
    repo = export / "triton"
    python_stand_ins(repo)
    old_frames = [cv2.imread(str(min((built["data"] / t / "test" / "good").glob("*.png")))) for t in TASKS]
    new_frames = [cv2.imread(str(p)) for p in sorted((synth_root / new / "test").rglob("*.png"))[:4]]
    answered, failures, stop = [], [], threading.Event()

    def stream(http: int) -> None:  # bounded in count and time
        with RemoteRuntime(f"127.0.0.1:{http}", retries=0) as remote:
            deadline = time.monotonic() + 300
            while not stop.is_set() and time.monotonic() < deadline and len(answered) < 4000:
                try:
                    answered.extend(remote.infer(old_frames, with_maps=False))
                except Exception as exc:  # noqa: BLE001 - every failed request is one the switch lost
                    failures.append(exc)

    with tritonserver(repo, tmp_path, monkeypatch, "--model-control-mode", "explicit", "--load-model", "*") as http:
        with RemoteRuntime(f"127.0.0.1:{http}", retries=0) as remote:
            assert remote.tasks == TASKS and new not in {r.task for r in remote.infer(new_frames, with_maps=False)}
        streamer = threading.Thread(target=stream, args=(http,))
        streamer.start()
        try:
            added = CliRunner().invoke(app, ["export", "--model", str(model), "--task", new, "--out", str(export)])
            assert added.exit_code == 0, added.output
            python_stand_ins(repo)  # the rewritten repository's ONNX models, as the bundled server runs them
            loaded = run_printed_loads(added.output, http)
            assert loaded == ["moleflow_backbone", *(f"moleflow_task_{t}" for t in sorted([*TASKS, new])),
                              "moleflow_info", "moleflow"]  # fmt: skip
            deadline = time.monotonic() + 120  # the stream goes on until it has met the new export
            while streamer.is_alive() and not any(len(r.distances) == 3 for r in answered[-2:]):
                assert time.monotonic() < deadline, "the streaming client never got an answer of the new export"
                time.sleep(0.2)
        finally:
            stop.set()
            streamer.join(60)
        with Runtime.load(export) as runtime:
            want = runtime.infer([*new_frames, *old_frames])
        with RemoteRuntime(f"127.0.0.1:{http}", retries=0) as remote:
            got = remote.infer([*new_frames, *old_frames], with_maps=False)
    assert not failures and all(r.error is None for r in answered)
    assert {len(r.distances) for r in answered} == {2, 3}  # answered by the old export, then by the new one
    assert [r.task for r in answered] == TASKS * (len(answered) // len(TASKS))
    assert new in [w.task for w in want] and [g.task for g in got] == [w.task for w in want]
    assert all(
        g.image_score == pytest.approx(w.image_score, rel=1e-5) for g, w in zip(got, want, strict=True) if w.image_score
    )
