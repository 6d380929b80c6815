"""Which torch device train, eval and export use, mixed precision on it, and CUDA errors a user can act on.

``--device auto|cpu|cuda|cuda:N`` is parsed here once, so every command refuses a bad value
the same way (a DeviceError, a ValueError the CLI prints without a traceback). Training side
only: the runtime never imports torch.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import re
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import torch

from moleflow_edge.errors import UserError

DEVICE_HELP = "auto (CUDA when torch sees a GPU), cpu, cuda or cuda:N"
_SPEC = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")

P = ParamSpec("P")
R = TypeVar("R")


class DeviceError(UserError):
    """A device that cannot be used here, or CUDA out of memory; the message says what to do."""


def resolve_device(spec: str | torch.device) -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> a device this machine has, or a DeviceError saying why not."""
    text = str(spec).strip().lower()
    match = _SPEC.match(text)
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        raise DeviceError(f"unknown device {spec!r}: use {DEVICE_HELP}")
    kind, index = match.group(1), match.group(2)
    if kind == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = (
            "a CPU-only build of torch" if torch.version.cuda is None else f"torch built for CUDA {torch.version.cuda}"
        )
        raise DeviceError(
            f"--device {text}: CUDA is not available here ({build}, no usable GPU or driver); "
            "use --device cpu, or install a CUDA build of torch on a machine with an NVIDIA GPU"
        )
    count = torch.cuda.device_count()
    number = int(index or 0)
    if number >= count:
        raise DeviceError(
            f"--device {text}: there is no GPU {number}; this machine has {count} "
            f"(cuda:0..cuda:{count - 1}; CUDA_VISIBLE_DEVICES may hide others)"
        )
    return torch.device("cuda", number)


def describe(device: torch.device) -> str:
    """'cpu' or 'cuda:0 (NVIDIA H100 80GB HBM3)': what the commands print as the chosen device."""
    if device.type != "cuda":
        return str(device)
    return f"{device} ({torch.cuda.get_device_name(device)})"


def amp_dtype(device: torch.device, enabled: bool = True) -> torch.dtype | None:
    """float16 autocast on CUDA (every NVIDIA GPU and Jetson has it; its 11-bit mantissa keeps the
    flow's sums closer to float32 than bfloat16's 8 bits, and a GradScaler covers its range);
    None on the CPU or with mixed precision switched off (training stays float32)."""
    return torch.float16 if enabled and device.type == "cuda" else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision for the backbone and flow subnets (``dtype`` None: a no-op). Reductions
    such as the log-det sum and exp stay float32 under autocast's own op lists."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def pinned(array: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``array`` on ``device``; from page-locked memory and asynchronous on CUDA, so the copy of the
    next batch overlaps the backbone still running on the current one."""
    if device.type != "cuda":
        return array.to(device)
    return array.pin_memory().to(device, non_blocking=True)


def out_of_memory_message(what: str, batch_hint: str) -> str:
    """The OOM error text: where it happened, the GPU's memory, and which batch size to lower."""
    memory = ""
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        memory = f" ({free / 2**30:.1f} of {total / 2**30:.1f} GiB free on {torch.cuda.get_device_name()})"
    return f"CUDA ran out of memory while {what}{memory}: lower {batch_hint}, or use --device cpu"


def names_batch_on_oom(
    what: str, batch_hint: Callable[[dict[str, Any]], str]
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorator: CUDA out-of-memory inside the call becomes a DeviceError naming the batch size to
    lower; ``batch_hint`` gets the call's bound arguments, so it names the batch that call used."""

    def wrap(function: Callable[P, R]) -> Callable[P, R]:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def call(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return function(*args, **kwargs)
            except torch.cuda.OutOfMemoryError as exc:
                bound = signature.bind(*args, **kwargs)
                bound.apply_defaults()
                raise DeviceError(out_of_memory_message(what, batch_hint(bound.arguments))) from exc

        return call

    return wrap


def choose_threads(requested: int | None) -> tuple[int | None, str | None]:
    """Torch threads for a training, eval or demo run, and a line saying why when it is not torch's default.

    When other work holds the cores, torch's threads wait on each other at every small op, so a
    busy machine gets 1 thread unless asked otherwise (docs/decisions.md#one-thread-when-busy).
    """
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if requested is not None or cores < 2 or load < cores / 2:
        return requested, None
    return 1, (f"note: this machine is busy (load {load:.1f} on {cores} cores): torch runs on 1 thread, since its "
               "threads would wait on each other; --threads N overrides")  # fmt: skip
