"""The one table of deployment targets: where an export can run, what that needs, and whether
this machine has it installed.

Every list of "where a model runs" comes from TARGETS: the CLI's ``--backend`` and
``bench --backends`` choices, the runtime's ``auto`` order (the table's order, best first),
the benchmark's rows, ``doctor``'s report and the README's table. ENGINES says which class each
engine kind (and so each target) builds, as a "module:Class" path that the runtime imports only
when that engine is asked for (runtime/backend_factory.py). Torch-free, and it imports no engine
until asked whether one is installed, so that the runtime, the CLI and doctor read it first
(doctor also where OpenCV or onnxruntime is missing).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from importlib import metadata
from typing import TYPE_CHECKING

from moleflow_edge.contract import Precision
from moleflow_edge.errors import InputError


class Backend(str, Enum):
    """Inference engines the runtime drives; AUTO tries the table's ``auto`` targets in order.

    TRITON_BLS is no deployment target: it runs only inside Triton, where the repository's ``moleflow``
    model builds it (its graphs are BLS calls to the repository's other models)."""

    AUTO = "auto"
    ONNXRUNTIME = "onnxruntime"
    OPENVINO = "openvino"
    TENSORRT = "tensorrt"
    TORCH = "torch"  # the trained model itself (moleflow_edge/torch_backend.py): eval and the eager bench, no export
    TRITON_BLS = "triton-bls"


# The one backend table: engine kind -> "module:Class", imported when that engine is asked for. Every
# class takes (root, manifest, options: RuntimeOptions) and subclasses runtime.backend.GraphBackend;
# an engine that lives outside runtime/ is one line here (and one Backend member). TORCH is no entry:
# it runs a trained model directory, not an export (torch_backend.runtime_of builds it).
ENGINES: dict[Backend, str] = {
    Backend.ONNXRUNTIME: "moleflow_edge.runtime.ort_backend:OrtBackend",
    Backend.OPENVINO: "moleflow_edge.runtime.openvino_backend:OpenVinoBackend",
    Backend.TENSORRT: "moleflow_edge.runtime.tensorrt_backend:TensorRtBackend",
    Backend.TRITON_BLS: "moleflow_edge.serving.triton.models.moleflow_model:BlsBackend",
}


class ExportFormat(str, Enum):
    """What ``moleflow-edge export --format`` writes: ONNX graphs, or ONNX graphs plus TensorRT plans, or
    ONNX graphs plus a Triton model repository (serving/triton/repository.py)."""

    ONNX = "onnx"
    ENGINE = "engine"
    TRITON = "triton"


@dataclass(frozen=True)
class Target:
    """One place an export runs: an engine, its execution provider(s), the device and what to install."""

    name: str
    backend: Backend
    providers: tuple[str, ...]  # onnxruntime execution providers in preference order; () for other engines
    precisions: tuple[Precision, ...]
    device: str  # "cpu" or "nvidia-gpu"
    extra: str  # the moleflow-edge extra that installs it
    export_format: ExportFormat  # what the export directory must hold
    auto: bool  # tried by backend "auto", in table order
    needs: str = ""  # what pip cannot install

    @property
    def provider(self) -> str | None:
        """The execution provider that defines the target (the others are its fallbacks)."""
        return self.providers[0] if self.providers else None

    @property
    def install(self) -> str:
        return f"pip install 'moleflow-edge[{self.extra}]'" + (f", with {self.needs}" if self.needs else "")


ALL = tuple(Precision)
GPU_ORT = ("CUDAExecutionProvider", "CPUExecutionProvider")
# Best first: this order is the runtime's "auto" order. OpenVINO is not in it: on the same graphs
# onnxruntime's CPU provider was faster (benchmarks/README.md, Runtime), so it runs only when asked for.
TARGETS: tuple[Target, ...] = (
    Target("tensorrt", Backend.TENSORRT, (), ALL, "nvidia-gpu", "tensorrt", ExportFormat.ENGINE, True,
           "an NVIDIA GPU (on a Jetson: JetPack's TensorRT and [jetson] instead)"),
    Target("onnxruntime-tensorrt", Backend.ONNXRUNTIME, ("TensorrtExecutionProvider", *GPU_ORT), ALL, "nvidia-gpu",
           "gpu", ExportFormat.ONNX, True, "the TensorRT 10 libraries"),
    Target("onnxruntime-cuda", Backend.ONNXRUNTIME, GPU_ORT, ALL, "nvidia-gpu", "gpu", ExportFormat.ONNX, True,
           "the CUDA 12 and cuDNN 9 libraries"),
    Target("onnxruntime-cpu", Backend.ONNXRUNTIME, ("CPUExecutionProvider",), ALL, "cpu", "cpu", ExportFormat.ONNX,
           True),
    Target("openvino-cpu", Backend.OPENVINO, (), ALL, "cpu", "openvino", ExportFormat.ONNX, False),
)  # fmt: skip

TARGET_NAMES: tuple[str, ...] = tuple(t.name for t in TARGETS)

# typer choices: "auto" and every target, straight from the table
if TYPE_CHECKING:  # mypy reads an Enum's members from literals only: to it, a str Enum of unknown members

    class TargetChoice(str, Enum): ...

else:
    TargetChoice = Enum("TargetChoice", {"AUTO": "auto", **{t.name.upper().replace("-", "_"): t.name for t in TARGETS}},
                        type=str)  # fmt: skip
TargetChoice.__doc__ = "A deployment target from the table, or auto."


def target(name: str) -> Target:
    """The table row called ``name``; the error lists the choices."""
    for row in TARGETS:
        if row.name == name:
            return row
    raise InputError(f"unknown target {name!r}; choose one of {', '.join(TARGET_NAMES)}")


def resolve_backend(choice: str) -> tuple[Backend, tuple[str, ...] | None]:
    """An engine name ("auto", "onnxruntime", ...) or a target name -> (engine, onnxruntime providers).

    Providers are None where the engine picks its own (an engine name, or AUTO)."""
    value = getattr(choice, "value", choice)
    if value in {b.value for b in Backend}:
        return Backend(value), None
    if value in TARGET_NAMES:
        row = target(value)
        return row.backend, row.providers or None
    raise InputError(f"unknown backend {value!r}; choose auto or a target: {', '.join(TARGET_NAMES)}")


ONNXRUNTIME_DISTRIBUTIONS = (
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxruntime-openvino",
    "onnxruntime-directml",
    "onnxruntime-qnn",
    "onnxruntime-training",
)  # fmt: skip; each installs `onnxruntime`
ONNXRUNTIME_HINT = (
    "pip install 'moleflow-edge[cpu]' (CPU) or 'moleflow-edge[gpu]' (NVIDIA GPU), not both: "
    "onnxruntime and onnxruntime-gpu install the same module"
)


def check_export_args(fmt: str, precisions: Iterable[str]) -> tuple[ExportFormat, tuple[Precision, ...]]:
    """Validate an export format and its precisions; errors name the bad value and the choices."""
    try:
        export_format = ExportFormat(fmt)
    except ValueError:
        raise InputError(f"unknown export format {fmt!r}; choose one of {[f.value for f in ExportFormat]}") from None
    chosen: list[Precision] = []
    for name in precisions:
        try:
            precision = Precision(name)
        except ValueError:
            raise InputError(f"unknown precision {name!r}; choose from {[p.value for p in Precision]}") from None
        if precision not in chosen:
            chosen.append(precision)
    if not chosen:
        raise InputError("give at least one precision (fp32, fp16 or int8)")
    return export_format, tuple(chosen)


def markdown_table() -> str:
    """The README's target table, generated here so that a test can hold the README to it."""
    lines = [
        "| target | backend | execution provider | precisions | device | install | export format |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in TARGETS:
        precisions = ", ".join(p.value for p in t.precisions)
        auto = "" if t.auto else " (not in auto)"
        needs = f", with {t.needs}" if t.needs else ""
        lines.append(
            f"| `{t.name}`{auto} | {t.backend.value} | {t.provider or '-'} | {precisions} | {t.device} "
            f"| `[{t.extra}]`{needs} | {t.export_format.value} |"
        )
    return "\n".join(lines)


def installed(distribution: str) -> str | None:
    """The version pip recorded for ``distribution``, or None."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def module_available(name: str) -> bool:
    """True when ``name`` can be imported, without importing it (and so without its import cost)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def onnxruntime_providers() -> list[str]:
    """Execution providers compiled into the installed onnxruntime build; [] without onnxruntime."""
    if not module_available("onnxruntime"):
        return []
    import onnxruntime as ort

    return list(ort.get_available_providers())


def not_installed(target: Target) -> str | None:
    """What this machine lacks to use ``target`` (packages, providers), None when it is installed.

    Installed is not yet working: a GPU, its driver and engines built for it are checked when
    the backend is created (and reported by ``moleflow-edge doctor``)."""
    if target.backend is Backend.ONNXRUNTIME:
        if not module_available("onnxruntime"):
            return f"onnxruntime is not installed: {ONNXRUNTIME_HINT}"
        if target.provider not in onnxruntime_providers():
            return f"this onnxruntime build has no {target.provider}: {target.install}"
    elif target.backend is Backend.OPENVINO and not module_available("openvino"):
        return f"OpenVINO is not installed: {target.install}"
    elif target.backend is Backend.TENSORRT:
        missing = [m for m, found in (("tensorrt", module_available("tensorrt")), ("cuda-python", cuda_python()))
                   if not found]  # fmt: skip
        if missing:
            return f"{' and '.join(missing)} not installed: {target.install}"
    return None


def cuda_python() -> bool:
    """cuda-python >= 12.6 installs cuda.bindings, older releases cuda.cudart."""
    return module_available("cuda.bindings") or module_available("cuda.cudart")
