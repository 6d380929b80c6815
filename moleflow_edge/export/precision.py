"""Lower-precision variants of an fp32 ONNX graph: fp16 compute, INT8 as explicit QDQ.

Both keep the graph's inputs and outputs as they are (uint8 images, fp32 features and
scores), so the runtime feeds every precision the same way. INT8 is an explicit
Quantize/DequantizeLinear graph: TensorRT builds it without calibrators (which TensorRT 11
removed), and onnxruntime runs it on CPU.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# Ops that compute in fp16 in an fp16 graph; every other op (LayerNormalization, reductions,
# Pow, TopK, ...) gets fp32 inputs. Normalisation statistics and the NLL's sum of squares over
# D channels are where fp16's 11-bit mantissa would cost accuracy.
FP16_OPS = frozenset({
    "Add", "AveragePool", "BatchNormalization", "Cast", "Clip", "Concat", "Conv", "Div", "Einsum", "Exp",
    "Flatten", "Gemm", "Identity", "MatMul", "MaxPool", "Mul", "Pad", "Relu", "Reshape", "Sigmoid", "Slice",
    "Split", "Squeeze", "Sub", "Tanh", "Transpose", "Unsqueeze",
})  # fmt: skip
# Only the matrix products are quantized: the coupling's exp/tanh and the score's reductions
# stay in float, where INT8 would cost accuracy for no speed.
INT8_OP_TYPES = ("Conv", "MatMul", "Gemm")
CALIB_BATCH = 8
INT8_FLOAT_LEADING = 4
ACTIVATIONS = frozenset({"Clip", "HardSigmoid", "HardSwish", "LeakyRelu", "Relu", "Sigmoid", "Tanh"})
FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
FP16_MAX = 65504.0


def to_fp16(proto: onnx.ModelProto, fp16_ops: frozenset[str] = FP16_OPS) -> onnx.ModelProto:
    """fp16 weights and compute for ``fp16_ops``, fp32 elsewhere; graph inputs/outputs keep their types.

    A small pass of our own rather than onnxconverter-common 1.16, which mistypes Cast nodes,
    breaks graph outputs that are also consumed inside the graph, and loops forever when Cast
    is blocked.
    """
    model = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    graph = model.graph
    original = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output, *graph.value_info]}
    initializers = {t.name: t for t in graph.initializer}
    original.update({name: t.data_type for name, t in initializers.items()})
    outputs = {v.name for v in graph.output}
    dtype = {name: FLOAT for name in [*initializers, *(v.name for v in graph.input)] if original[name] == FLOAT}
    copies: dict[tuple[str, int], str] = {}
    nodes: list[onnx.NodeProto] = []
    new_initializers: list[TensorProto] = []

    def as_type(name: str, want: int) -> str:
        """A tensor holding ``name``'s value as ``want``: a converted weight or a Cast, made once."""
        if dtype[name] == want:
            return name
        if (name, want) not in copies:
            target = f"{name}.{'fp16' if want == HALF else 'fp32'}"
            if name in initializers:
                values = np.clip(numpy_helper.to_array(initializers[name]), -FP16_MAX, FP16_MAX)
                new_initializers.append(
                    numpy_helper.from_array(values.astype(helper.tensor_dtype_to_np_dtype(want)), target)
                )
            else:
                nodes.append(helper.make_node("Cast", [name], [target], name=f"{target}.cast", to=want))
            dtype[target] = want
            copies[(name, want)] = target
        return copies[(name, want)]

    for node in graph.node:
        compute = HALF if node.op_type in fp16_ops else FLOAT
        for i, name in enumerate(node.input):
            if name and original.get(name) == FLOAT:
                node.input[i] = as_type(name, compute)
        cast_to = [a for a in node.attribute if a.name == "to"] if node.op_type == "Cast" else []
        if cast_to and cast_to[0].i == FLOAT:
            cast_to[0].i = compute
        nodes.append(node)
        for i, name in enumerate(node.output):
            if original.get(name) != FLOAT:
                continue
            dtype[name] = compute
            if compute == HALF and name in outputs:  # a graph output stays fp32: compute a copy and cast it
                node.output[i] = copies[(name, HALF)] = f"{name}.fp16"
                dtype[node.output[i]] = HALF
                nodes.append(helper.make_node("Cast", [node.output[i]], [name], name=f"{name}.cast", to=FLOAT))
                dtype[name] = FLOAT

    used = {name for node in nodes for name in node.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.node[:], graph.value_info[:], graph.initializer[:]
    graph.node.extend(nodes)
    graph.initializer.extend([*kept, *new_initializers])
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    return model


def sensitive_products(proto: onnx.ModelProto, leading: int = INT8_FLOAT_LEADING) -> list[str]:
    """Names of the Conv/MatMul/Gemm nodes a backbone keeps in float in its INT8 graph.

    Two kinds: the first ``leading`` products (stem and first block, at the highest resolution:
    their error runs through every later layer), and the products with no activation after them
    (linear bottlenecks writing the residual stream, the embedding's projections), whose error is
    neither clamped nor masked by a ReLU and adds up block after block
    (docs/decisions.md#int8-float-products).
    """
    consumers: dict[str, list[str]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    products = [node for node in proto.graph.node if node.op_type in INT8_OP_TYPES]
    unactivated = [n for n in products if not ACTIVATIONS.intersection(consumers.get(n.output[0], []))]
    return list(dict.fromkeys(n.name for n in [*products[:leading], *unactivated]))


class _BatchReader:
    """onnxruntime CalibrationDataReader over an (N, ...) array in batches, one range at a time.

    With ``CalibStridedMinMax`` = 1 onnxruntime folds each batch into the running min/max and
    drops its activations, so calibration memory stays one batch whatever N is.
    """

    def __init__(self, input_name: str, data: np.ndarray) -> None:
        self.input_name = input_name
        self.batches = [np.ascontiguousarray(data[i : i + CALIB_BATCH]) for i in range(0, len(data), CALIB_BATCH)]
        self.pending: Iterator[np.ndarray] = iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.pending = iter(self.batches[start_index:end_index])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.pending, None)
        return None if batch is None else {self.input_name: batch}


def to_int8(proto: onnx.ModelProto, calibration: np.ndarray, nodes_to_exclude: Sequence[str] = ()) -> onnx.ModelProto:
    """QDQ INT8 graph calibrated (min/max) on ``calibration``, a batch of the graph's input.

    Symmetric INT8 activations and per-channel symmetric weights: the only scheme TensorRT's
    explicit quantization accepts (zero points must be 0).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if len(calibration) == 0:
        raise ValueError("INT8 calibration needs at least one image")
    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save_model(proto, str(source))
        quantize_static(
            str(source),
            str(target),
            _BatchReader(proto.graph.input[0].name, calibration),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(INT8_OP_TYPES),
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=list(nodes_to_exclude),
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={
                "ActivationSymmetric": True,
                "WeightSymmetric": True,
                "CalibStridedMinMax": 1,
                # biases stay float: onnxruntime would store them as int32 behind a DequantizeLinear, and
                # TensorRT dequantizes only int8/fp8/int4 (onnx-tensorrt's QuantDequantLinearHelper)
                "QuantizeBias": False,
                # Q/DQ on the inputs of each product only, where TensorRT wants them: a quantized conv
                # output before ReLU6 gets the symmetric range of the raw output (+-180 in the stem), so
                # ReLU6's [0, 6] is left with a handful of levels (measured: embedding error 45%).
                "OpTypesToExcludeOutputQuantization": list(INT8_OP_TYPES),
            },
        )
        return onnx.load_model(str(target))
