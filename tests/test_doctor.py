"""moleflow-edge doctor: its JSON on this machine agrees with independent probes, --export says which
targets run an export (and refuses a tampered one), and a second onnxruntime build, a GPU without GPU
targets, or a missing engine are found before a command fails halfway."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from moleflow_edge.contract import load_manifest
from moleflow_edge.targets import TARGET_NAMES, not_installed, target

REPO = Path(__file__).resolve().parents[1]


def doctor(*args: str, env: dict[str, str] | None = None) -> tuple[int, dict]:
    """`moleflow-edge doctor --json ...` in a fresh interpreter, as a script would call it."""
    done = subprocess.run(
        [sys.executable, "-m", "moleflow_edge.cli", "doctor", "--json", *args],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})},
    )  # fmt: skip
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout)


@pytest.fixture(scope="module")
def here() -> tuple[int, dict]:
    return doctor()


def test_json_on_this_machine_matches_what_is_installed(here: tuple[int, dict]) -> None:
    code, report = here
    assert code == (0 if report["ok"] else 1) and report["ok"] == (not report["problems"])
    assert report["python"]["version"] == ".".join(map(str, sys.version_info[:3]))
    assert report["numpy"]["version"] == np.__version__ and report["opencv"]["version"] == cv2.__version__
    gstreamer = re.search(r"GStreamer:\s*(\w+)", cv2.getBuildInformation()).group(1) == "YES"
    assert report["opencv"]["gstreamer"] == gstreamer
    assert report["onnxruntime"]["version"] == ort.__version__
    assert report["onnxruntime"]["providers"] == ort.get_available_providers()
    assert report["torch"]["present"] == (importlib.util.find_spec("torch") is not None)
    assert report["cameras"] == [] or all(Path(c["device"]).exists() for c in report["cameras"])
    assert [row["target"] for row in report["targets"]] == list(TARGET_NAMES)
    for row in report["targets"]:
        installed = not_installed(target(row["target"])) is None
        gpu_ok = target(row["target"]).device == "cpu" or bool(report["cuda"]["gpus"])
        assert row["usable"] == (installed and gpu_ok), row


def test_doctor_never_imports_torch() -> None:
    code = "import sys\nfrom moleflow_edge.doctor import diagnose\ndiagnose()\nprint('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "False", done.stderr


def test_export_lists_which_targets_run_it(built: dict) -> None:
    code, report = doctor("--export", str(built["export_dir"]))
    export = report["export"]
    manifest = load_manifest(built["export_dir"])
    assert export["tasks"] == manifest.task_names and export["precisions"] == sorted(manifest.backbone_graphs)
    rows = {row["target"]: row for row in export["targets"]}
    assert set(rows) == set(TARGET_NAMES)
    cpu = rows["onnxruntime-cpu"]
    assert cpu["can_run"] and cpu["precisions"] == ["fp32", "int8"] and cpu["why_not"] is None
    if not manifest.engines:  # the TensorRT target needs plans built on its GPU
        assert not rows["tensorrt"]["can_run"] and rows["tensorrt"]["why_not"]
    for name, row in rows.items():
        assert row["can_run"] != bool(row["why_not"]), name
    assert code == (0 if report["ok"] else 1)


def test_tampered_export_is_a_problem(built: dict, tmp_path: Path) -> None:
    export = tmp_path / "export"
    shutil.copytree(built["export_dir"], export)
    flow = next((export / "detectors").glob("*.onnx"))
    flow.write_bytes(flow.read_bytes()[:-1])
    code, report = doctor("--export", str(export))
    assert code == 1 and not report["ok"]
    assert any("export refused" in p and flow.name in p for p in report["problems"])


def test_two_onnxruntime_builds_are_a_problem(tmp_path: Path) -> None:
    # what pip leaves behind after `pip install moleflow-edge[gpu]` on top of an onnxruntime install
    info = tmp_path / "site" / "onnxruntime_gpu-1.20.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: onnxruntime-gpu\nVersion: 1.20.1\n")
    path = os.pathsep.join(filter(None, [str(tmp_path / "site"), os.environ.get("PYTHONPATH")]))
    code, report = doctor(env={"PYTHONPATH": path})
    assert code == 1 and report["onnxruntime"]["distributions"].get("onnxruntime-gpu") == "1.20.1"
    problem = next(p for p in report["problems"] if "onnxruntime builds are installed" in p)
    assert "pip uninstall -y onnxruntime onnxruntime-gpu" in problem and "moleflow-edge[cpu]" in problem


def test_gpu_found_by_nvidia_smi_without_gpu_targets(tmp_path: Path) -> None:
    """A GPU desktop with the CPU profile: the GPU is reported (name, compute capability, driver's CUDA)
    and doctor says to install the GPU profile. nvidia-smi is a stand-in printing what the real one does."""
    if not_installed(target("onnxruntime-cuda")) is None:
        pytest.skip("a GPU build of onnxruntime is installed here")
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text(
        "#!/bin/sh\n"
        'case "$1" in --query-gpu=*) echo "NVIDIA GeForce RTX 3090, 8.6, 550.54.14" ;;\n'
        '  *) echo "| NVIDIA-SMI 550.54.14   Driver Version: 550.54.14   CUDA Version: 12.4 |" ;; esac\n'
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    code, report = doctor(env={"PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}"})
    if report["cuda"]["cuda_python"]:
        pytest.skip("cuda-python answers before nvidia-smi here")
    assert report["cuda"]["gpus"] == [{"name": "NVIDIA GeForce RTX 3090", "compute_capability": "86",
                                       "driver": "550.54.14"}]  # fmt: skip
    assert report["cuda"]["driver_cuda"] == "12.4"
    assert any("NVIDIA GPU is here but no GPU target is usable" in w for w in report["warnings"])
    cuda = next(row for row in report["targets"] if row["target"] == "onnxruntime-cuda")
    assert not cuda["usable"] and "moleflow-edge[gpu]" in cuda["why_not"]
    assert code == (0 if report["ok"] else 1)


def test_human_report_names_every_component(built: dict) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "moleflow_edge.cli", "doctor", "--export", str(built["export_dir"])],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    for label in ("platform", "python", "numpy", "opencv", "onnxruntime", "openvino", "tensorrt", "cuda", "gpu",
                  "torch", "serving", "cameras", "targets", "export"):  # fmt: skip
        assert re.search(rf"^{label}\b", done.stdout, re.MULTILINE), label
    assert re.search(r"^  runs onnxruntime-cpu\s+fp32, int8$", done.stdout, re.MULTILINE)


def test_serving_says_why_not_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Python built without a shared libpython (pyenv's default) cannot host tritonserver's Python stub."""
    import sysconfig

    from moleflow_edge.doctor import serving_info

    real = sysconfig.get_config_var
    monkeypatch.setattr(sysconfig, "get_config_var", lambda name: 0 if name == "Py_ENABLE_SHARED" else real(name))
    info = serving_info()
    assert not info["usable"] and info["libpython"] is None and "\n" not in info["why_not"]
    expected = "--enable-shared" if info["pytriton"] and info["tritonclient"] else "pip install 'moleflow-edge[serve]'"
    assert expected in info["why_not"]
