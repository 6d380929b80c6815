"""The export's router file -> the RouterTable the runtime routes with, in manifest task order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from moleflow_edge.contract import Manifest, ManifestError
from moleflow_edge.router import Prototype, RouterTable


def load_router_table(root: Path, manifest: Manifest) -> RouterTable:
    """RouterTable from router.safetensors, in manifest task order, with each task's distance limit."""
    if manifest.router_file is None:
        raise ManifestError(f"{root} has no router prototypes (router_file missing from the manifest): re-export")
    path = root / manifest.router_file.file
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise ManifestError(f"{path} cannot be read as safetensors: {exc}") from exc
    prototypes = []
    for entry in manifest.tasks:
        mean, whitener = tensors.get(f"{entry.name}.mean"), tensors.get(f"{entry.name}.whitener")
        if mean is None or whitener is None:
            raise ManifestError(f"{path} has no prototype for task {entry.name!r}: re-export the router")
        c = manifest.routing_dim
        if mean.shape != (c,) or whitener.shape != (c, c):
            raise ManifestError(
                f"{path}: task {entry.name!r} prototype has shapes {mean.shape}, {whitener.shape}; "
                f"the manifest says routing_dim {c}"
            )
        level = tensors.get(f"{entry.name}.patch_level")  # optional (migrations/model_dir.py)
        prototypes.append(
            Prototype(
                mean.astype(np.float32),
                whitener.astype(np.float32),
                float(entry.distance_limit),
                patch_level=None if level is None else (float(level[0]), float(level[1])),
            )
        )
    return RouterTable(manifest.task_names, prototypes, [entry.detector for entry in manifest.tasks])
