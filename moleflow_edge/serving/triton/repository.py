"""`export --format triton`: a standard Triton model repository for a full Triton server (the NGC
container, KServe or Triton on Kubernetes), read from an export directory's manifest:

    REPO/moleflow_backbone/1/model.onnx      onnxruntime: images (B,S,S,3) uint8 -> embedding, routing_feature
    REPO/moleflow_task_<task>/1/model.onnx   onnxruntime: embedding -> patch_scores, image_score
    REPO/moleflow/1/model.py                 Python backend (BLS): decode, then the Runtime with BLS calls
                                             for graphs; the manifest and router weights beside it
    REPO/moleflow_info/1/model.py            Python backend: what is served (RemoteRuntime reads it)

Each with a config.pbtxt written through Triton's own protobuf types (tritonclient's model_config_pb2):
max_batch_size, dynamic batching, instance groups (KIND_AUTO: the GPU where there is one). ``moleflow``
speaks serving/protocol.py, so `run --server` and RemoteRuntime work against it as against `serve`.
The repository is written under the export's lock, built beside the target and swapped in by one
atomic step, so a kill leaves the old one or the new one. Its manifest copy and info.json are
written by serving/triton/decisions.py, which ``calibrate`` also calls, so the repository in EXPORT/triton
serves the thresholds and limits of the export's latest manifest.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import onnx

from moleflow_edge.atomic import replace_folder
from moleflow_edge.contract import ArtifactFile, Precision, load_manifest
from moleflow_edge.errors import UserError
from moleflow_edge.locking import FolderLock
from moleflow_edge.serving.protocol import BACKBONE_MODEL, INFO, INFO_MODEL, INFO_QUERY, MODEL, task_model
from moleflow_edge.serving.triton.configs import config_text, frame_tensors, model_config
from moleflow_edge.serving.triton.decisions import TRITON_FOLDER, RepositoryOptions, version_folder, write_decisions
from moleflow_edge.serving.triton.models import info_model, moleflow_model

__all__ = ["write_triton_repository"]

ONNX_TYPES: dict[int, str] = {  # keys: onnx TensorProto.DataType values
    onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16", onnx.TensorProto.DOUBLE: "TYPE_FP64",
    onnx.TensorProto.UINT8: "TYPE_UINT8", onnx.TensorProto.INT8: "TYPE_INT8", onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.INT64: "TYPE_INT64",
}  # fmt: skip
STAGING = ".staging-"  # OUT's parent/.<OUT name>.staging-<run id>: a repository being written


def _tensors(values: list[onnx.ValueInfoProto]) -> list[dict]:
    """A graph's inputs or outputs as config tensors, without the batch dimension; a named (dynamic) size is -1."""
    return [
        {"name": v.name, "data_type": ONNX_TYPES[v.type.tensor_type.elem_type],
         "dims": [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim[1:]]}
        for v in values
    ]  # fmt: skip


def _onnx_model(root: Path, artifact: ArtifactFile, folder: Path, name: str, batching: tuple[int, int, int]):  # noqa: ANN202
    """Copy a graph (and its external weights, under the name the graph refers to) as NAME/1/model.onnx."""
    source = root / artifact.file
    graph = onnx.load(str(source), load_external_data=False)
    version = folder / name / "1"
    version.mkdir(parents=True)
    shutil.copyfile(source, version / "model.onnx")
    if artifact.data_file:
        locations = {e.value for t in graph.graph.initializer for e in t.external_data if e.key == "location"}
        for location in locations:
            shutil.copyfile(root / artifact.data_file, version / location)
    config = model_config(name, *batching, platform="onnxruntime_onnx", input=_tensors(list(graph.graph.input)),
                     output=_tensors(list(graph.graph.output)))  # fmt: skip
    for tensor in [*config.input, *config.output]:
        if not tensor.dims:  # batch only, as image_score (B,): Triton's way to say so
            tensor.dims.append(1)
            tensor.reshape.SetInParent()
    return config


def write_triton_repository(
    export_dir: str | Path, out: str | Path | None = None, options: RepositoryOptions | None = None
) -> list[Path]:
    """Write the repository for ``export_dir``'s graphs to ``out`` (default EXPORT/triton, the one every
    command that rewrites the export's manifest keeps in step), replacing a previous one whole; returns
    every config.pbtxt written.

    Under the export's lock (no export or calibration changes the manifest meanwhile), the repository is
    built in a staging folder beside ``out`` and swapped in by one atomic step (atomic.replace_folder):
    a kill leaves the previous repository or the new one, and a staging folder that the next run sweeps."""
    root, options = Path(export_dir), options or RepositoryOptions()
    out = Path(out) if out is not None else root / TRITON_FOLDER
    with FolderLock(root, "writing the Triton repository"):
        for stale in out.parent.glob(f".{out.name}{STAGING}*"):  # killed runs' (the lock says none is live)
            shutil.rmtree(stale, ignore_errors=True)
        staging = out.parent / f".{out.name}{STAGING}{uuid.uuid4().hex[:12]}"
        try:
            _write(root, staging, options)
            replace_folder(staging, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return sorted(out.glob("*/config.pbtxt"))


def _write(root: Path, staging: Path, options: RepositoryOptions) -> None:
    """Every model of the repository into the new folder ``staging``."""
    from tritonclient.grpc import model_config_pb2 as pb

    prec, key = options.precision, Precision(options.precision)
    manifest = load_manifest(root, verify=True)
    missing = ([BACKBONE_MODEL] if key not in manifest.backbone_graphs else []) + [
        t.name for t in manifest.tasks if key not in t.graphs
    ]
    if missing or not manifest.tasks:
        raise UserError(f"{root} has no {prec} graph for {', '.join(missing) or 'any task'}: export it first")
    staging.mkdir(parents=True)
    batching = (options.max_batch, options.max_queue_delay_us, options.instances)
    configs = {BACKBONE_MODEL: _onnx_model(root, manifest.backbone_graphs[key], staging, BACKBONE_MODEL, batching)}
    for entry in manifest.tasks:
        name = task_model(entry.name)
        configs[name] = _onnx_model(root, entry.graphs[key], staging, name, batching)

    write_decisions(root, manifest, staging, options)  # the manifest, router weights, info.json, options
    shutil.copyfile(moleflow_model.__file__, version_folder(staging, MODEL) / "model.py")
    configs[MODEL] = model_config(MODEL, *batching, backend="python", **frame_tensors(),
                                  parameters={"map_side_cap": pb.ModelParameter(string_value=str(options.map_side_cap)),
                                              "precision": pb.ModelParameter(string_value=prec)})  # fmt: skip

    shutil.copyfile(info_model.__file__, version_folder(staging, INFO_MODEL) / "model.py")
    configs[INFO_MODEL] = model_config(INFO_MODEL, 0, 0, 1, backend="python",
                                       input=[{"name": INFO_QUERY, "data_type": "TYPE_STRING", "dims": [1]}],
                                       output=[{"name": INFO, "data_type": "TYPE_STRING", "dims": [1]}])  # fmt: skip
    for name, config in configs.items():
        (staging / name / "config.pbtxt").write_text(config_text(config))
