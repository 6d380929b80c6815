"""Which engine runs an export: the one asked for, or under auto the first target of the table
(moleflow_edge.targets, best first) that works here. Every engine is built through the one backend
table (targets.ENGINES: engine kind -> class) with one signature, ``cls(root, manifest, options)``;
each class's module is imported only when it is chosen, so a missing optional engine costs nothing
until asked for."""

from __future__ import annotations

from dataclasses import replace
from importlib import import_module
from pathlib import Path

from moleflow_edge.contract import Manifest, ManifestError
from moleflow_edge.runtime.backend import BackendError, GraphBackend, not_installed
from moleflow_edge.runtime.options import RuntimeOptions
from moleflow_edge.targets import ENGINES, ONNXRUNTIME_HINT, TARGET_NAMES, TARGETS, Backend, resolve_backend, target


def engine_class(kind: Backend) -> type[GraphBackend]:
    """The class the backend table names for ``kind``, imported now."""
    try:
        module, _, name = ENGINES[kind].partition(":")
    except KeyError:
        raise BackendError(f"no engine is registered for {kind.value!r} (targets.ENGINES)") from None
    try:
        return getattr(import_module(module), name)
    except ModuleNotFoundError as exc:  # an optional engine's package (onnxruntime, openvino, tensorrt)
        hint = ONNXRUNTIME_HINT if exc.name == "onnxruntime" else f"pip install {exc.name}"
        raise BackendError(f"engine {kind.value!r} needs {exc.name}, which is not installed: {hint}") from exc


def create_backend(root: Path, manifest: Manifest, options: RuntimeOptions) -> tuple[GraphBackend, list[str]]:
    """The engine or deployment target ``options.backend`` names, or under AUTO the first target of the
    table (moleflow_edge.targets, best first) that works here; also why the ones before it did not."""
    kind, _ = resolve_backend(options.backend)
    if kind is Backend.TORCH:
        raise BackendError("the torch backend runs a trained model directory, not an export: choose another backend")
    if kind is not Backend.AUTO:
        name = getattr(options.backend, "value", options.backend)
        reason = not_installed(target(name)) if name in TARGET_NAMES else None
        if reason is not None:
            raise BackendError(f"target {name!r} is not usable here: {reason}")
        return engine_class(kind)(root, manifest, options), []
    skipped: list[str] = []
    for row in (t for t in TARGETS if t.auto):
        reason = not_installed(row)
        if reason is None:
            try:  # the row's own providers, not ones given for a named target
                made = engine_class(row.backend)(root, manifest, replace(options, backend=row.name, providers=None))
            except (BackendError, ManifestError) as exc:
                reason = str(exc)
            else:
                if made.provider == row.provider:
                    return made, skipped
                made.close()  # e.g. a GPU build of onnxruntime on a machine without a usable GPU
                reason = f"onnxruntime fell back to {made.provider}"
        skipped.append(f"{row.name}: {reason}")
    raise BackendError("no target can run this export here: " + "; ".join(skipped))
