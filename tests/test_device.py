"""--device on the CPU: parsing, the refusals a user sees, CUDA out-of-memory, and that the device
and mixed-precision options leave a CPU model's files and its export byte for byte the same.

What only a GPU can show (CUDA training against CPU training, fp16 timings, device buffers) is
benchmarks/gpu_check.py's job.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import moleflow_edge.train as train_module
from moleflow_edge.cli import app
from moleflow_edge.device import DeviceError, amp_dtype, names_batch_on_oom, resolve_device
from moleflow_edge.export.exporter import export_model
from moleflow_edge.train import train_task
from tests.conftest import TINY_CONFIG

CONFIG = TINY_CONFIG.with_settings("flow", max_steps=6, batch_size=4)


def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def one_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


@pytest.mark.parametrize("spec", ["cpu", "CPU", " cpu "])
def test_cpu_spellings(spec: str) -> None:
    assert resolve_device(spec) == torch.device("cpu")


def test_auto_picks_cuda_where_torch_sees_it(monkeypatch: pytest.MonkeyPatch) -> None:
    no_cuda(monkeypatch)
    assert resolve_device("auto") == torch.device("cpu")
    one_gpu(monkeypatch)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:x", "cpu:0", "auto:1", "cuda:-1", ""])
def test_unknown_spellings_name_the_choices(spec: str) -> None:
    with pytest.raises(DeviceError, match="auto .*cpu, cuda or cuda:N"):
        resolve_device(spec)


@pytest.mark.parametrize("spec", ["cuda", "cuda:0"])
def test_cuda_without_cuda_says_so(monkeypatch: pytest.MonkeyPatch, spec: str) -> None:
    no_cuda(monkeypatch)
    with pytest.raises(DeviceError, match="CUDA is not available here.*use --device cpu"):
        resolve_device(spec)


def test_out_of_range_index_names_the_gpus_there_are(monkeypatch: pytest.MonkeyPatch) -> None:
    one_gpu(monkeypatch)
    with pytest.raises(DeviceError, match=r"no GPU 3; this machine has 1 \(cuda:0\.\.cuda:0"):
        resolve_device("cuda:3")


def test_amp_only_on_cuda() -> None:
    assert amp_dtype(torch.device("cpu")) is None
    assert amp_dtype(torch.device("cuda", 0)) is torch.float16
    assert amp_dtype(torch.device("cuda", 0), enabled=False) is None


def test_out_of_memory_names_the_batch_of_the_call() -> None:
    @names_batch_on_oom("doing it", lambda args: f"batch (now {args['batch']})")
    def work(batch: int = 12) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(DeviceError, match=r"CUDA ran out of memory while doing it.*lower batch \(now 12\)"):
        work()
    with pytest.raises(DeviceError, match=r"now 3\)"):
        work(batch=3)


def test_training_out_of_memory_names_batch_size(
    synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def exhausted(*args: object, **kwargs: object) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(train_module, "training_features", exhausted)
    with pytest.raises(DeviceError, match=r"batch_size in the --config JSON \(now 4\)"):
        train_task(synth_root, "weave", tmp_path / "model", CONFIG, progress=False, random_backbone=True)
    assert not (tmp_path / "model" / "tasks.json").exists()


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (["train", "--device", "cuda"], "CUDA is not available here"),
        (["train", "--device", "tpu"], "unknown device 'tpu'"),
        (["eval", "--device", "cuda:1"], "CUDA is not available here"),
        (["export", "--all", "--device", "cuda"], "CUDA is not available here"),
    ],
)
def test_cli_refuses_a_bad_device_before_any_work(
    synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: list[str], message: str
) -> None:
    no_cuda(monkeypatch)
    model = tmp_path / "model"
    args = {"train": ["--data", str(synth_root), "--task", "weave", "--model", str(model)],
            "eval": ["--data", str(synth_root), "--model", str(model)],
            "export": ["--model", str(model), "--out", str(tmp_path / "export")]}[command[0]]  # fmt: skip
    result = CliRunner().invoke(app, [*command, *args])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert not model.exists() and not (tmp_path / "export").exists()


def test_engine_export_on_the_cpu_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    no_cuda(monkeypatch)
    result = CliRunner().invoke(
        app, ["export", "--model", str(tmp_path / "m"), "--all", "--format", "engine", "--device", "auto"]
    )
    assert result.exit_code == 2 and "--format engine builds TensorRT engines on the GPU" in result.output


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_device_and_amp_options_leave_model_and_export_bytes_unchanged(synth_root: Path, tmp_path: Path) -> None:
    """The same task trained through 'cpu' (float32) and 'auto' with AMP requested (a no-op here)
    saves the same safetensors bytes, all CPU tensors, and exports to the same ONNX bytes."""
    runs = {"plain": ("cpu", False), "auto": ("auto", True)}
    saved, exported = {}, {}
    for name, (device, amp) in runs.items():
        model_dir = tmp_path / name / "model"
        train_task(synth_root, "weave", model_dir, CONFIG, progress=False, device=device, amp=amp)
        saved[name] = {k: v for k, v in _files(model_dir).items() if not k.startswith(".")}
        export_model(model_dir, tmp_path / name / "export")
        exported[name] = {k: v for k, v in _files(tmp_path / name / "export").items() if k.endswith(".onnx")}
    assert saved["plain"] == saved["auto"] and any(k.endswith(".safetensors") for k in saved["plain"])
    assert exported["plain"] == exported["auto"] and exported["plain"]


def test_train_and_eval_threads_option_sets_torch_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """--threads N, or 1 on a busy machine, is applied to torch before training or eval starts."""
    from moleflow_edge.cli_support import set_torch_threads

    before = torch.get_num_threads()
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    try:
        monkeypatch.setattr("os.getloadavg", lambda: (0.1, 0.1, 0.1))
        set_torch_threads(1)
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        set_torch_threads(None)  # idle machine, nothing asked: torch's own setting stays
        assert torch.get_num_threads() == 2
        monkeypatch.setattr("os.getloadavg", lambda: (6.0, 6.0, 6.0))
        set_torch_threads(None)  # busy machine: one thread
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
