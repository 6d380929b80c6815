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
The repository is built beside the target and swapped in whole.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx

from moleflow_edge.contract import ArtifactFile, Precision, load_manifest
from moleflow_edge.export.triton_models import info_model, moleflow_model
from moleflow_edge.serving.protocol import (
    BACKBONE_MODEL,
    ENCODED,
    IMAGES,
    INFO,
    INFO_MODEL,
    INFO_QUERY,
    MODEL,
    OUTPUTS,
    describe,
    task_model,
)

__all__ = ["write_triton_repository"]

ONNX_TYPES = {
    onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16", onnx.TensorProto.DOUBLE: "TYPE_FP64",
    onnx.TensorProto.UINT8: "TYPE_UINT8", onnx.TensorProto.INT8: "TYPE_INT8", onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.INT64: "TYPE_INT64",
}  # fmt: skip
NUMPY_TYPES = {
    "S": "TYPE_STRING",
    "f4": "TYPE_FP32",
    "f8": "TYPE_FP64",
    "i1": "TYPE_INT8",
    "i4": "TYPE_INT32",
    "u1": "TYPE_UINT8",
}


def _numpy_type(dtype: type) -> str:
    kind = np.dtype(dtype)
    return NUMPY_TYPES["S" if kind.kind == "S" else f"{kind.kind}{kind.itemsize}"]


def _config(name: str, max_batch: int, queue_delay_us: int, instances: int, **fields: object):  # noqa: ANN202
    """A ModelConfig message: batching and instances here, the rest (platform or backend, inputs, outputs) given."""
    from tritonclient.grpc import model_config_pb2 as pb

    config = pb.ModelConfig(name=name, max_batch_size=max_batch, **fields)
    if max_batch > 0:
        config.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
    config.instance_group.add(count=instances, kind=pb.ModelInstanceGroup.KIND_AUTO)
    return config


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
    config = _config(name, *batching, platform="onnxruntime_onnx", input=_tensors(list(graph.graph.input)),
                     output=_tensors(list(graph.graph.output)))  # fmt: skip
    for tensor in [*config.input, *config.output]:
        if not tensor.dims:  # batch only, as image_score (B,): Triton's way to say so
            tensor.dims.append(1)
            tensor.reshape.SetInParent()
    return config


def write_triton_repository(
    export_dir: str | Path,
    out: str | Path,
    *,
    precision: Precision | str = Precision.FP32,
    max_batch: int = 8,
    max_queue_delay_us: int = 2000,
    instances: int = 1,
    map_side_cap: int = 1024,
) -> list[Path]:
    """Write the repository for ``export_dir``'s graphs at ``precision`` to ``out`` (replacing a previous
    one whole); returns every config.pbtxt written."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as pb

    from moleflow_edge.runtime.runtime import Runtime

    root, out, prec = Path(export_dir), Path(out), Precision(getattr(precision, "value", precision))
    if max_batch < 1 or max_queue_delay_us < 0 or instances < 1:
        raise ValueError("max_batch and instances must be >= 1, max_queue_delay_us >= 0")
    manifest = load_manifest(root, verify=True)
    missing = ([BACKBONE_MODEL] if prec.value not in manifest.backbone_graphs else []) + [
        t.name for t in manifest.tasks if prec.value not in t.graphs
    ]
    if missing or not manifest.tasks:
        raise ValueError(f"{root} has no {prec.value} graph for {', '.join(missing) or 'any task'}: export it first")
    staging = out.parent / f".{out.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    batching = (max_batch, max_queue_delay_us, instances)
    configs = {
        BACKBONE_MODEL: _onnx_model(root, manifest.backbone_graphs[prec.value], staging, BACKBONE_MODEL, batching)
    }
    for entry in manifest.tasks:
        configs[task_model(entry.name)] = _onnx_model(
            root, entry.graphs[prec.value], staging, task_model(entry.name), batching
        )

    bls = staging / MODEL / "1"
    bls.mkdir(parents=True)
    shutil.copyfile(moleflow_model.__file__, bls / "model.py")
    shutil.copyfile(root / "manifest.json", bls / "manifest.json")
    assert manifest.router_file is not None  # load_manifest refuses an export without one
    shutil.copyfile(root / manifest.router_file.file, bls / manifest.router_file.file)
    inputs = [
        {"name": IMAGES, "data_type": "TYPE_UINT8", "dims": [-1, -1, 3], "optional": True},
        {"name": ENCODED, "data_type": "TYPE_STRING", "dims": [1], "optional": True},
    ]
    outputs = [{"name": n, "data_type": _numpy_type(t), "dims": list(shape)} for n, (t, shape) in OUTPUTS.items()]
    configs[MODEL] = _config(MODEL, *batching, backend="python", input=inputs, output=outputs,
                             parameters={"map_side_cap": pb.ModelParameter(string_value=str(map_side_cap)),
                                         "precision": pb.ModelParameter(string_value=prec.value)})  # fmt: skip

    info = staging / INFO_MODEL / "1"
    info.mkdir(parents=True)
    shutil.copyfile(info_model.__file__, info / "model.py")
    with Runtime.load(root, "onnxruntime-cpu", prec) as runtime:
        served = {**describe(runtime, max_batch, map_side_cap), "description": f"Triton model repository, {prec.value}"}
    (info / "info.json").write_text(json.dumps(served) + "\n")
    configs[INFO_MODEL] = _config(INFO_MODEL, 0, 0, 1, backend="python",
                                  input=[{"name": INFO_QUERY, "data_type": "TYPE_STRING", "dims": [1]}],
                                  output=[{"name": INFO, "data_type": "TYPE_STRING", "dims": [1]}])  # fmt: skip

    for name, config in configs.items():
        (staging / name / "config.pbtxt").write_text(text_format.MessageToString(config))
    previous = out.parent / f".{out.name}.previous"
    shutil.rmtree(previous, ignore_errors=True)
    if out.exists():
        out.rename(previous)
    staging.rename(out)
    shutil.rmtree(previous, ignore_errors=True)
    return sorted(out.glob("*/config.pbtxt"))
