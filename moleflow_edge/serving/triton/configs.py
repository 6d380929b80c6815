"""Triton model configs, written through Triton's own protobuf types (tritonclient's model_config_pb2):
batching and instances, and the tensors of a model that speaks serving/protocol.py."""

from __future__ import annotations

from typing import Any, TypedDict

import numpy as np

from moleflow_edge.serving.protocol import ENCODED, IMAGES, OUTPUTS

NUMPY_TYPES = {"S": "TYPE_STRING", "f4": "TYPE_FP32", "f8": "TYPE_FP64", "i1": "TYPE_INT8", "i4": "TYPE_INT32",
               "u1": "TYPE_UINT8"}  # fmt: skip


def numpy_type(dtype: type) -> str:
    """A numpy dtype's name in a Triton model config."""
    kind: np.dtype = np.dtype(dtype)
    return NUMPY_TYPES["S" if kind.kind == "S" else f"{kind.kind}{kind.itemsize}"]


def model_config(name: str, max_batch: int, queue_delay_us: int, instances: int, **fields: object) -> Any:
    """A ModelConfig message: batching and instances here, the rest (platform or backend, inputs, outputs) given."""
    from tritonclient.grpc import model_config_pb2 as pb

    config = pb.ModelConfig(name=name, max_batch_size=max_batch, **fields)
    if max_batch > 0:
        config.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
    config.instance_group.add(count=instances, kind=pb.ModelInstanceGroup.KIND_AUTO)
    return config


class Tensors(TypedDict):
    """A model config's tensors, by the ModelConfig fields they fill."""

    input: list[dict]
    output: list[dict]


def frame_tensors() -> Tensors:
    """The inputs and outputs of a model speaking serving/protocol.py (frames in, FrameResult fields out)."""
    return {
        "input": [
            {"name": IMAGES, "data_type": "TYPE_UINT8", "dims": [-1, -1, 3], "optional": True},
            {"name": ENCODED, "data_type": "TYPE_STRING", "dims": [1], "optional": True},
        ],
        "output": [{"name": n, "data_type": numpy_type(t), "dims": list(s)} for n, (t, s) in OUTPUTS.items()],
    }


def config_text(config: Any) -> str:
    """A ModelConfig as config.pbtxt's text."""
    from google.protobuf import text_format

    return text_format.MessageToString(config)
