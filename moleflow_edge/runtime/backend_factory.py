"""Which engine runs an export: the one asked for, or under auto the first target of the table
(moleflow_edge.targets, best first) that works here. Each engine's module is imported only when
it is chosen, so a missing optional engine costs nothing until asked for."""

from __future__ import annotations

from pathlib import Path

from moleflow_edge.contract import Manifest, ManifestError, Precision
from moleflow_edge.runtime.backend import Backend, BackendError, GraphBackend, module_available, not_installed
from moleflow_edge.targets import ONNXRUNTIME_HINT, TARGET_NAMES, TARGETS, resolve_backend, target


def create_backend(
    backend: Backend | str,
    root: Path,
    manifest: Manifest,
    precision: Precision,
    *,
    threads: int | None = None,
    device_id: int = 0,
    providers: list[str] | None = None,
    io_binding: bool | None = None,
    trt_cache_dir: Path | None = None,
) -> tuple[GraphBackend, list[str]]:
    """The engine or deployment target asked for, or under AUTO the first target of the table
    (moleflow_edge.targets, best first) that works here; also why the ones before it did not."""
    kind, target_providers = resolve_backend(backend)

    def onnxruntime(chosen: list[str] | None) -> GraphBackend:
        if not module_available("onnxruntime"):
            raise BackendError(f"onnxruntime is not installed: {ONNXRUNTIME_HINT}")
        from moleflow_edge.runtime.ort_backend import OrtBackend

        cache = trt_cache_dir
        if cache is None and "TensorrtExecutionProvider" in (chosen or []):
            cache = root / "engines" / "ort_trt_cache"
        return OrtBackend(root, manifest, precision, chosen, threads, device_id, io_binding, cache)

    def openvino(_: list[str] | None) -> GraphBackend:
        from moleflow_edge.runtime.openvino_backend import OpenVinoBackend

        return OpenVinoBackend(root, manifest, precision, threads=threads)

    def tensorrt(_: list[str] | None) -> GraphBackend:
        from moleflow_edge.runtime.tensorrt_backend import TensorRtBackend

        return TensorRtBackend(root, manifest, precision, device_id)

    factories = {Backend.ONNXRUNTIME: onnxruntime, Backend.OPENVINO: openvino, Backend.TENSORRT: tensorrt}
    if kind is Backend.TORCH:
        raise BackendError("the torch backend runs a trained model directory, not an export: choose another backend")
    if kind is not Backend.AUTO:
        name = getattr(backend, "value", backend)
        reason = not_installed(target(name)) if name in TARGET_NAMES else None
        if reason is not None:
            raise BackendError(f"target {name!r} is not usable here: {reason}")
        return factories[kind](providers or (list(target_providers) if target_providers else None)), []
    skipped: list[str] = []
    for row in (t for t in TARGETS if t.auto):
        reason = not_installed(row)
        if reason is None:
            try:
                made = factories[row.backend](list(row.providers) or None)
            except (BackendError, ManifestError) as exc:
                reason = str(exc)
            else:
                if made.provider == row.provider:
                    return made, skipped
                made.close()  # e.g. a GPU build of onnxruntime on a machine without a usable GPU
                reason = f"onnxruntime fell back to {made.provider}"
        skipped.append(f"{row.name}: {reason}")
    raise BackendError("no target can run this export here: " + "; ".join(skipped))
