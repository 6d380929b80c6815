"""One table of deployment targets: the CLI, the runtime's auto order, bench and the README all read it;
a missing onnxruntime or OpenCV is an error naming the extra to install."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moleflow_edge.bench.pipelines import BACKENDS
from moleflow_edge.cli import app
from moleflow_edge.runtime import BackendError, Runtime, RuntimeOptions
from moleflow_edge.targets import (
    TARGET_NAMES,
    TARGETS,
    ExportFormat,
    markdown_table,
    not_installed,
    resolve_backend,
    target,
)

REPO = Path(__file__).resolve().parents[1]


def _choices(*args: str) -> list[str]:
    """The choices the CLI offers for an option, read from its refusal of a bad value."""
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "400"})
    assert result.exit_code == 2, result.output
    listed = re.search(r"is not one of (.+?)\.?\s*│?\n", result.output)
    assert listed, result.output
    return re.findall(r"'([^']+)'", listed.group(1))


def test_cli_bench_and_readme_list_the_table() -> None:
    assert _choices("run", "--export", "x", "--source", "y", "--backend", "gpu") == ["auto", *TARGET_NAMES]
    assert _choices("export", "--model", "x", "--all", "--format", "tflite") == [f.value for f in ExportFormat]
    assert BACKENDS == ("torch-eager", *TARGET_NAMES)
    refused = CliRunner().invoke(app, ["bench", "--export", "x", "--backends", "onnxruntime-cpu,cuda"])
    assert refused.exit_code == 2 and "unknown backend cuda" in refused.output
    readme = (REPO / "README.md").read_text()
    assert markdown_table() in readme, "README's target table differs from moleflow_edge/targets.py: regenerate it"
    # every format has a target that runs it, but triton: a model repository for a Triton server, not a local target
    assert {t.export_format for t in TARGETS} == set(ExportFormat) - {ExportFormat.TRITON}


def test_target_names_resolve_to_engine_and_providers() -> None:
    backend, providers = resolve_backend("onnxruntime-cuda")
    assert backend.value == "onnxruntime" and providers == ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert resolve_backend("openvino-cpu") == (resolve_backend("openvino")[0], None)
    with pytest.raises(ValueError, match="onnxruntime-cpu"):
        resolve_backend("tensorflow")


def test_auto_takes_the_first_installed_target_of_the_table(built: dict) -> None:
    rt = Runtime.load(built["export_dir"])
    auto = [t for t in TARGETS if t.auto]
    first = next(t for t in auto if not_installed(t) is None)
    skipped = [line.split(":", 1)[0] for line in rt.skipped_backends]
    assert skipped == [t.name for t in auto[: auto.index(first)]]  # everything better, in table order
    assert rt.backend is first.backend and (first.provider is None or first.provider in rt.description)
    rt.close()


def test_a_target_that_is_not_installed_says_what_to_install(built: dict) -> None:
    missing = [t for t in TARGETS if not_installed(t) is not None]
    if not missing:
        pytest.skip("every target is installed here")
    for row in missing:
        with pytest.raises(BackendError, match=rf"target '{row.name}' is not usable here: .*\[{row.extra}\]"):
            Runtime.load(built["export_dir"], RuntimeOptions(row.name))


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter whose imports of onnxruntime / cv2 fail as if not installed."""
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


BLOCK = "import sys\nfor name in sys.argv[1].split(','):\n    sys.modules[name] = None  # as if not installed\n"


def test_without_onnxruntime_the_runtime_names_both_extras(built: dict) -> None:
    done = _python(BLOCK + f"""
from moleflow_edge.runtime import Runtime, BackendError
try:
    Runtime.load({str(built["export_dir"])!r})
except BackendError as exc:
    print(exc)
""", "onnxruntime")  # fmt: skip
    assert done.returncode == 0, done.stderr
    message = done.stdout
    assert "no target can run this export here" in message and "onnxruntime is not installed" in message
    assert "moleflow-edge[cpu]" in message and "moleflow-edge[gpu]" in message and "not both" in message


def test_cli_without_opencv_says_what_to_install(built: dict, tmp_path: Path) -> None:
    done = _python(BLOCK + """
from moleflow_edge.cli import main
sys.argv = ["moleflow-edge", "run", "--export", sys.argv[2], "--source", sys.argv[3]]
main()
""", "cv2", str(built["export_dir"]), str(tmp_path))  # fmt: skip
    assert done.returncode == 2
    assert "cv2 is not installed: pip install 'moleflow-edge[cpu]'" in done.stderr and "Traceback" not in done.stderr


def test_doctor_without_opencv_still_reports_and_fails() -> None:
    done = _python(BLOCK + """
from moleflow_edge.cli import main
sys.argv = ["moleflow-edge", "doctor", "--json"]
main()
""", "cv2")  # fmt: skip
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert not report["opencv"]["importable"] and any("OpenCV does not import" in p for p in report["problems"])
    assert report["onnxruntime"]["importable"] == (not_installed(target("onnxruntime-cpu")) is None)  # still reported
