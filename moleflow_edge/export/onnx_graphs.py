"""The three kinds of graph of an export as torch modules, and the one way they are written to ONNX.

Input/output names come from the manifest contract. Only the batch axis is dynamic: spatial
sizes are fixed by the config, so the graphs carry no shape arithmetic.
We use the torch.export-based exporter (torch's default since 2.9): it folds static shapes and
padding into the ops, where the TorchScript exporter leaves Shape/Gather/Reshape chains.
It emits opset 18 natively; onnx's down-converter to 17 fails on these graphs (no Split
18->17 adapter), and TensorRT 10's parser takes opsets up to 20.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import warnings
from collections.abc import Sequence
from pathlib import Path

import onnx
import torch
from torch import nn

from moleflow_edge.contract import DISTANCES, EMBEDDING, IMAGE_SCORE, IMAGES, PATCH_SCORES, ROUTING_FEATURE
from moleflow_edge.model.continual_model import ContinualModel
from moleflow_edge.model.scorer import PatchScorer
from moleflow_edge.router import RouterTable

OPSET = 18
BATCH = "batch"
EXAMPLE_BATCH = 2  # a traced batch of 1 would be specialised to a constant
MAX_PROTO_BYTES = 1_800_000_000  # protobuf's 2 GiB cap, with room: larger graphs keep weights in a data file


class BackboneGraph(nn.Module):
    """images uint8 (B,S,S,3) BGR -> embedding (B,D,H,W), routing_feature (B,C); preprocessing inside."""

    def __init__(self, model: ContinualModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.model.backbone_maps(images)
        return self.model.embed(self.model.patch_concat(maps)), self.model.routing_feature(maps)


class RouterGraph(nn.Module):
    """routing_feature (B,C) -> squared Mahalanobis distances (B,T): RouterTable.distances in float32."""

    def __init__(self, table: RouterTable) -> None:
        super().__init__()
        self.register_buffer("stacked", torch.from_numpy(table.stacked))  # (C, T*C)
        self.register_buffer("shift", torch.from_numpy(table.shift))  # (T, C)

    def forward(self, routing_feature: torch.Tensor) -> torch.Tensor:
        projected = (routing_feature @ self.stacked).reshape(-1, *self.shift.shape)
        return (projected - self.shift).pow(2).sum(dim=2)


def export_onnx(
    module: nn.Module, example: torch.Tensor, input_name: str, output_names: Sequence[str]
) -> onnx.ModelProto:
    """Export ``module`` (one input) to an ONNX model with a dynamic batch axis and nothing else dynamic."""
    if importlib.util.find_spec("onnxscript") is None:
        raise ImportError("ONNX export needs onnxscript (torch's exporter uses it): pip install onnxscript")
    module.eval()
    batch = torch.export.Dim(BATCH, min=1, max=4096)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's progress chatter and deprecation notes
        program = torch.onnx.export(
            module,
            (example,),
            input_names=[input_name],
            output_names=list(output_names),
            opset_version=OPSET,
            dynamo=True,
            dynamic_shapes=({0: batch},),
            optimize=True,
            verbose=False,
        )
    assert program is not None
    proto = program.model_proto
    proto.producer_name = "moleflow-edge"
    onnx.checker.check_model(proto, full_check=True)
    return proto


def backbone_graph(model: ContinualModel) -> onnx.ModelProto:
    size = model.config.image_size
    example = torch.zeros(EXAMPLE_BATCH, size, size, 3, dtype=torch.uint8)
    return export_onnx(BackboneGraph(model), example, IMAGES, (EMBEDDING, ROUTING_FEATURE))


def scorer_graph(scorer: PatchScorer, dim: int, grid: int) -> onnx.ModelProto:
    """A task's scorer (a merged flow or a memory bank: model/scorer.py's shape) as ONNX."""
    example = torch.zeros(EXAMPLE_BATCH, dim, grid, grid)
    return export_onnx(scorer, example, EMBEDDING, (PATCH_SCORES, IMAGE_SCORE))


def router_graph(table: RouterTable) -> onnx.ModelProto:
    example = torch.zeros(EXAMPLE_BATCH, table.stacked.shape[0])
    return export_onnx(RouterGraph(table), example, ROUTING_FEATURE, (DISTANCES,))


def save_onnx(proto: onnx.ModelProto, path: Path) -> Path | None:
    """Write ``proto`` to ``path``; a graph over protobuf's size cap keeps its weights in a data
    file beside it (``<name>.data``, the name recorded inside the graph). Returns that file or None."""
    if proto.ByteSize() < MAX_PROTO_BYTES:
        onnx.save_model(proto, str(path))
        return None
    data = path.with_name(path.name + ".data")
    clone = onnx.ModelProto()
    clone.CopyFrom(proto)  # saving externally rewrites the tensors; the caller's proto stays whole
    onnx.save_model(clone, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)
    return data


def graph_io(proto: onnx.ModelProto) -> dict[str, tuple[int, list[int | str]]]:
    """name -> (ONNX element type, shape with dim_param names for symbolic axes) for inputs and outputs."""
    result = {}
    for value in [*proto.graph.input, *proto.graph.output]:
        tensor = value.type.tensor_type
        result[value.name] = (tensor.elem_type, [d.dim_param or d.dim_value for d in tensor.shape.dim])
    return result
