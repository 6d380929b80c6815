"""Will TensorRT's ONNX parser take this graph? Checked on every exported graph, no GPU needed.

The rules are what onnx-tensorrt 10.x (the parser inside TensorRT 10; docs/operators.md of the
10.1 release, ModelImporter.cpp) enforces and what can be seen in the graph itself:
  * the opset is in the parser's range and every op is in its support matrix (default domain);
  * every op gets a data type its row lists (e.g. Transpose takes no uint8, MatMul no int64);
  * uint8 only on graph inputs and outputs: a node that produces uint8 is refused ("TensorRT
    does not support UINT8 types for intermediate tensors"), so a uint8 image is cast first;
  * int8 only between QuantizeLinear and DequantizeLinear (explicit quantization), with zero
    points that are zero; no float64 (cast down with clamping) and no other integer types;
  * the restrictions column: pooling rank and dilations, Resize modes, TopK sorted and K,
    inputs that must be initializers (axes, K, depth), LayerNormalization's single output, ...;
  * static shapes where the parser or builder needs them: graph inputs and outputs except the
    batch axis (the optimisation profile's), convolution input channels, EyeLike.
Subgraphs of If/Loop/Scan are not descended into (the exported graphs have none).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

TRT_OPSET_RANGE = (9, 20)  # TensorRT 10.x parser
_F = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16})
_FI = _F | {TensorProto.INT32, TensorProto.INT64}
_FIB = _FI | {TensorProto.BOOL}
_B = frozenset({TensorProto.BOOL})
_F32_16 = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16})
_QUANTIZED = frozenset({TensorProto.INT8, TensorProto.FLOAT8E4M3FN, TensorProto.INT4})


def _ops(names: str, types: frozenset[int]) -> dict[str, frozenset[int]]:
    return dict.fromkeys(names.split(), types)


# op -> data types its "Supported Types" column lists (onnx-tensorrt 10.1 docs/operators.md)
TRT_OP_TYPES: dict[str, frozenset[int]] = {
    **_ops("Acos Acosh Asin Asinh Atan Atanh AveragePool BatchNormalization Ceil Celu Clip Conv ConvTranspose "
           "Cos Cosh CumSum Dropout Einsum Elu Erf Exp Floor Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool "
           "GroupNormalization GRU HardSigmoid HardSwish Hardmax ImageScaler InstanceNormalization IsInf "
           "LayerNormalization LeakyRelu Log LogSoftmax LRN LSTM LpNormalization LpPool MatMul MaxPool "
           "MeanVarianceNormalization ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike "
           "RandomUniform RandomUniformLike Reciprocal Resize RNN Round ScaledTanh Scan Selu Sigmoid Sin Sinh "
           "Softmax Softplus Softsign Sqrt Tan Tanh ThresholdedRelu Upsample", _F),
    **_ops("Abs Add ArgMax ArgMin DepthToSpace Div Equal Greater GreaterOrEqual IsNaN Less LessOrEqual Max Min "
           "Mod Mul Neg Pad Range ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin "
           "ReduceProd ReduceSum ReduceSumSquare Relu Scatter ScatterElements ScatterND Shrink Sign SpaceToDepth "
           "Sub Sum TopK", _FI),
    **_ops("Concat Constant ConstantOfShape Expand EyeLike Flatten Gather GatherElements GatherND Identity If "
           "Loop OneHot Reshape ReverseSequence Shape Size Slice Split Squeeze Tile Transpose Trilu Unsqueeze "
           "Where", _FIB),
    **_ops("And Not Or Xor", _B),
    **_ops("DeformConv GridSample Mish NonMaxSuppression NonZero RoiAlign", _F32_16),
    **_ops("Cast CastLike", _FIB | {TensorProto.UINT8}),
    "DequantizeLinear": _QUANTIZED,
    "Gelu": _FI | {TensorProto.INT8},
    "Mean": _FI | {TensorProto.FLOAT8E4M3FN},
}  # fmt: skip
# ops whose every input carries the data type (elementwise, variadic); the others: input 0 only
_ALL_INPUTS = frozenset("Add Sub Mul Div Mod Max Min Mean Sum Concat Equal Greater GreaterOrEqual Less LessOrEqual "
                        "And Or Xor MatMul Gemm PRelu".split())  # fmt: skip
# op -> input positions that must be initializers (the parser reads them at import time)
_WEIGHT_INPUTS = {
    "CumSum": (1,), "Pad": (3,), "Slice": (3,), "Squeeze": (1,), "Unsqueeze": (1,), "TopK": (1,), "OneHot": (1,),
    **dict.fromkeys("ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd "
                    "ReduceSum ReduceSumSquare".split(), (1,)),
}  # fmt: skip
_RESIZE = {
    "mode": {"nearest", "linear"},
    "coordinate_transformation_mode": {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric",
                                       "align_corners"},
    "nearest_mode": {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"},
    "keep_aspect_ratio_policy": {"stretch"},
}  # fmt: skip
_ALLOWED_TYPES = _FIB | _QUANTIZED | {TensorProto.UINT8}
TOPK_MAX = 3840


@dataclass
class CompatReport:
    """What the checker found; ``ok`` when TensorRT's parser should take the graph as it is."""

    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _type_name(elem: int) -> str:
    return TensorProto.DataType.Name(elem).lower()


def _label(node: onnx.NodeProto) -> str:
    return f"{node.op_type} ({node.name or 'unnamed'})"


class _Graph:
    """Types, shapes, constant values and consumers of every tensor of one (shape-inferred) graph."""

    def __init__(self, proto: onnx.ModelProto) -> None:
        inferred = onnx.shape_inference.infer_shapes(proto)
        graph = inferred.graph
        self.graph = graph
        values = [*graph.value_info, *graph.input, *graph.output]
        self.types = {v.name: v.type.tensor_type.elem_type for v in values}
        self.shapes = {v.name: v.type.tensor_type.shape for v in values if v.type.tensor_type.HasField("shape")}
        self.values: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.types.update({t.name: t.data_type for t in graph.initializer})
        for node in graph.node:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if node.op_type == "Constant" and value is not None:
                self.values[node.output[0]] = numpy_helper.to_array(value)
                self.types[node.output[0]] = value.data_type
        self.outputs = {v.name for v in graph.output}
        self.produced = {name: node for node in graph.node for name in node.output if name}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name:
                    self.consumers.setdefault(name, []).append((node, i))

    def static_dim(self, name: str, axis: int) -> bool:
        shape = self.shapes.get(name)
        return shape is not None and axis < len(shape.dim) and shape.dim[axis].HasField("dim_value")


def check_tensorrt_compat(proto: onnx.ModelProto, batch_axis_only: bool = True) -> CompatReport:
    """Check one graph against TensorRT 10's ONNX parser; every problem names the node or tensor."""
    report = CompatReport()
    g = _Graph(proto)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or not TRT_OPSET_RANGE[0] <= opset <= TRT_OPSET_RANGE[1]:
        report.problems.append(f"opset {opset} is outside TensorRT 10's parser range {TRT_OPSET_RANGE}")
    _check_io(g, batch_axis_only, report.problems)
    _check_tensor_types(g, report.problems)
    for node in g.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in TRT_OP_TYPES:
            report.problems.append(f"op {node.domain + '::' if node.domain else ''}{_label(node)} "
                                   "is not supported by TensorRT's ONNX parser")  # fmt: skip
            continue
        report.problems += _check_node(g, node)
    return report


def _check_io(g: _Graph, batch_axis_only: bool, problems: list[str]) -> None:
    for value in [*g.graph.input, *g.graph.output]:
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if not dim.HasField("dim_value") and (axis != 0 or not batch_axis_only):
                problems.append(f"{value.name}: axis {axis} is dynamic; only the batch axis (0) may be")


def _check_tensor_types(g: _Graph, problems: list[str]) -> None:
    """Graph-wide dtype rules: uint8 produced only as a graph output, int8 only around Q/DQ."""
    for name, elem in g.types.items():
        node = g.produced.get(name)
        if elem not in _ALLOWED_TYPES:
            hint = " (TensorRT casts it down to float32, clamping)" if elem == TensorProto.DOUBLE else ""
            problems.append(f"{name}: {_type_name(elem)} is not a TensorRT type{hint}; use float32 or int32")
        elif elem == TensorProto.UINT8 and node is not None and name not in g.outputs:
            problems.append(f"{name}: {_label(node)} produces uint8, which TensorRT allows only on graph inputs and "
                            "outputs (\"TensorRT does not support UINT8 types for intermediate tensors\"): "
                            "cast to float first")  # fmt: skip
        elif elem == TensorProto.INT8:
            from_q = node is None or node.op_type in ("QuantizeLinear", "Constant")
            to_dq = all(c.op_type == "DequantizeLinear" or (c.op_type == "QuantizeLinear" and i == 2)
                        for c, i in g.consumers.get(name, []))  # fmt: skip
            if not (from_q and to_dq):
                problems.append(f"{name}: int8 outside a QuantizeLinear -> DequantizeLinear pair; TensorRT takes "
                                "int8 only through explicit quantization")  # fmt: skip


def _data_inputs(node: onnx.NodeProto) -> Iterable[str]:
    if node.op_type == "Where":
        return node.input[1:3]
    if node.op_type in _ALL_INPUTS:
        return node.input
    return node.input[:1]


def _check_node(g: _Graph, node: onnx.NodeProto) -> list[str]:
    """The op's data types and the restrictions column of its row."""
    problems: list[str] = []
    label = _label(node)
    allowed = TRT_OP_TYPES[node.op_type]
    for name in _data_inputs(node):
        elem = g.types.get(name) if name else None
        if elem is not None and elem != TensorProto.UNDEFINED and elem not in allowed:
            kinds = ", ".join(sorted(_type_name(t) for t in allowed))
            problems.append(f"{label}: input {name!r} is {_type_name(elem)}; TensorRT's {node.op_type} takes {kinds}")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
    if node.op_type == "Cast" and attrs.get("to") not in allowed:
        problems.append(f"{label}: casts to {_type_name(int(attrs.get('to', 0)))}, which TensorRT does not support")
    for i in _WEIGHT_INPUTS.get(node.op_type, ()):
        if i < len(node.input) and node.input[i] and node.input[i] not in g.values:
            problems.append(f"{label}: input {node.input[i]!r} must be an initializer (a constant) for TensorRT")
    problems += [f"{label}: {p}" for p in _restrictions(g, node, attrs)]
    return problems


def _restrictions(g: _Graph, node: onnx.NodeProto, attrs: dict) -> list[str]:
    op = node.op_type
    found: list[str] = []

    def used(index: int) -> bool:
        name = node.output[index] if index < len(node.output) else ""
        return bool(name) and (name in g.consumers or name in g.outputs)

    if op in ("AveragePool", "MaxPool", "LpPool"):
        shape = g.shapes.get(node.input[0])
        if shape is not None and len(shape.dim) not in (4, 5):
            found.append("only 2D or 3D pooling is supported")
        if any(d != 1 for d in attrs.get("dilations", [])):
            found.append("dilations must be empty or all ones")
        if op == "MaxPool" and used(1):
            found.append("the Indices output is not supported")
    elif op == "Resize":
        defaults = {"mode": "nearest", "coordinate_transformation_mode": "half_pixel",
                    "nearest_mode": "round_prefer_floor", "keep_aspect_ratio_policy": "stretch"}  # fmt: skip
        for name, supported in _RESIZE.items():
            value = attrs.get(name, defaults[name])
            if value not in supported:
                found.append(f"{name}={value!r} is not supported (supported: {sorted(supported)})")
        if attrs.get("antialias", 0):
            found.append("antialiasing is not supported")
    elif op == "TopK":
        if attrs.get("sorted", 1) != 1:
            found.append("sorted must be 1")
        k = g.values.get(node.input[1])
        if k is not None and int(np.max(k)) >= TOPK_MAX:
            found.append(f"K={int(np.max(k))} must be less than {TOPK_MAX}")
    elif op in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2 and node.input[2]:
        zero = g.values.get(node.input[2])
        if zero is None or np.any(zero != 0):
            found.append("the zero point must be a constant 0 (symmetric quantization)")
    elif op == "LayerNormalization" and (used(1) or used(2)):
        found.append("only the first output (Y) is supported")
    elif op == "Dropout" and len(node.input) > 2 and node.input[2]:
        training = g.values.get(node.input[2])
        if training is None or bool(np.any(training)):
            found.append("training_mode must be an initializer that is False")
    elif op == "ScatterND" and attrs.get("reduction", "none") != "none":
        found.append("reduction is not supported")
    elif op == "LSTM" and (attrs.get("input_forget", 0) or attrs.get("layout", 0)):
        found.append("input_forget and layout must be 0")
    elif op in ("Conv", "ConvTranspose") and not g.static_dim(node.input[0], 1):
        found.append(f"the channel axis of {node.input[0]!r} must be static (a build-time constant)")
    elif op == "Einsum" and "..." in attrs.get("equation", ""):
        found.append("an ellipsis ('...') in the equation is not supported")
    elif op == "EyeLike":
        shape = g.shapes.get(node.input[0])
        if shape is None or not all(d.HasField("dim_value") for d in shape.dim):
            found.append("the input must have static dimensions")
    return found
