"""The error tree (moleflow_edge/errors.py): the CLI turns a user's mistake into one line, and lets a
bug through with its traceback, a ValueError included."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from moleflow_edge.atomic import OutputError
from moleflow_edge.calibration import CalibrationError, UpdateError
from moleflow_edge.contract import ManifestError
from moleflow_edge.data.mvtec import DatasetError
from moleflow_edge.errors import EngineError, InputError, LinkError, UserError
from moleflow_edge.export.artifacts import ExportError
from moleflow_edge.good_frames import FrameSourceError
from moleflow_edge.locking import FolderLocked
from moleflow_edge.model_store import ModelDirError
from moleflow_edge.preprocess import FrameError
from moleflow_edge.runtime.backend import BackendError
from moleflow_edge.runtime.cuda_memory import CudaError
from moleflow_edge.runtime.inference_runtime import ServerLost
from moleflow_edge.runtime.sources import CameraLost, SourceError
from moleflow_edge.runtime.trt_api import TensorRTVersionError
from moleflow_edge.serving.libpython import ServingUnavailable
from moleflow_edge.signing import SignatureError

ROOT = Path(__file__).resolve().parents[1]
EXIT_USER_ERROR = 2  # cli_support.fail
USER = [OutputError, CalibrationError, UpdateError, ManifestError, DatasetError, ExportError, FrameSourceError,
        FolderLocked, ModelDirError, FrameError, SignatureError, InputError]  # fmt: skip
STILL_VALUE_ERRORS = {InputError, SignatureError}  # errors.py and signing.py say why


@pytest.mark.parametrize("error", USER)
def test_a_user_error_is_caught_by_the_cli_and_only_the_documented_ones_stay_value_errors(error: type) -> None:
    assert issubclass(error, UserError)
    assert issubclass(error, ValueError) == (error in STILL_VALUE_ERRORS)


@pytest.mark.parametrize(
    ("error", "base"),
    [(BackendError, EngineError), (CudaError, EngineError), (TensorRTVersionError, EngineError),
     (ServingUnavailable, EngineError), (SourceError, LinkError), (CameraLost, LinkError), (ServerLost, LinkError)],
)  # fmt: skip
def test_engine_and_link_errors_are_not_user_errors(error: type, base: type) -> None:
    assert issubclass(error, base) and not issubclass(error, UserError)


def _synth(tmp_path: Path, raising: str) -> subprocess.CompletedProcess:
    """`moleflow-edge synth` in a child whose generate() raises ``raising`` (a bug, or a user's mistake)."""
    code = (
        "import moleflow_edge.data.synth as synth\n"
        "from moleflow_edge.errors import InputError\n"
        "def generate(*args, **kwargs):\n"
        f"    raise {raising}\n"
        "synth.generate = generate\n"
        "import sys\n"
        "from moleflow_edge.cli import main\n"
        f"sys.argv = ['moleflow-edge', 'synth', '--out', {str(tmp_path / 'data')!r}]\n"
        "main()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=False
    )


def test_an_internal_value_error_keeps_its_traceback(tmp_path: Path) -> None:
    bug = _synth(tmp_path, "ValueError('a bug deep inside')")
    assert bug.returncode not in (0, EXIT_USER_ERROR), bug.stderr
    assert "Traceback (most recent call last)" in bug.stderr
    assert "ValueError: a bug deep inside" in bug.stderr and "error: a bug" not in bug.stderr

    mistake = _synth(tmp_path, "InputError('a value the user gave')")
    assert mistake.returncode == EXIT_USER_ERROR
    assert mistake.stderr.strip() == "error: a value the user gave"
