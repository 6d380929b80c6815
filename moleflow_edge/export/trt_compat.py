"""Will TensorRT's ONNX parser take this graph? Checked on every exported graph, no GPU needed.

The op list is the "Y" rows of onnx-tensorrt's docs/operators.md (release 8.5 table), plus
LayerNormalization, which the parser takes natively since TensorRT 8.6. Newer parsers take
more ops; the list errs on the side of what every TensorRT 10 parser takes. Checks:
  * every op is in the list (default ONNX domain only: no custom or contrib ops);
  * inputs and outputs are static except axis 0 (the batch axis of the optimisation profile);
  * no int64 activations: int64 is allowed only for initialisers and for tensors computed from
    them alone (constant shapes, axes, indices feeding Reshape, Slice, TopK, ...), which the
    parser folds at build time. TensorRT casts int64 activations down to int32 with a warning
    and clamping, so an int64 tensor that depends on a graph input is reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx

TRT_OPSET_RANGE = (9, 20)  # TensorRT 10.x parser
TRT_ONNX_OPS = frozenset({
    "Abs", "Acos", "Acosh", "Add", "And", "ArgMax", "ArgMin", "Asin", "Asinh", "Atan", "Atanh", "AveragePool",
    "BatchNormalization", "Cast", "Ceil", "Celu", "Clip", "Concat", "Constant", "ConstantOfShape", "Conv",
    "ConvTranspose", "Cos", "Cosh", "CumSum", "DepthToSpace", "DequantizeLinear", "Div", "Dropout", "Einsum", "Elu",
    "Equal", "Erf", "Exp", "Expand", "EyeLike", "Flatten", "Floor", "Gather", "GatherElements", "GatherND",
    "Gemm", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "Greater", "GreaterOrEqual", "GridSample",
    "GRU", "HardSigmoid", "HardSwish", "Identity", "If", "ImageScaler", "InstanceNormalization",
    "IsNaN", "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax", "Loop", "LRN",
    "LSTM", "LpNormalization", "LpPool", "MatMul", "Max", "MaxPool", "Mean", "MeanVarianceNormalization", "Min",
    "Mod", "Mul", "Neg", "NonMaxSuppression", "NonZero", "Not", "OneHot", "Or", "Pad", "ParametricSoftplus", "Pow",
    "PRelu", "QuantizeLinear", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Range",
    "Reciprocal", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
    "ReduceProd", "ReduceSum", "ReduceSumSquare", "Relu", "Reshape", "Resize", "ReverseSequence", "RNN", "RoiAlign",
    "Round", "ScaledTanh", "Scan", "Scatter", "ScatterElements", "ScatterND", "Selu", "Shape", "Shrink", "Sigmoid",
    "Sign", "Sin", "Sinh", "Size", "Slice", "Softmax", "Softplus", "Softsign", "SpaceToDepth", "Split", "Sqrt",
    "Squeeze", "Sub", "Sum", "Tan", "Tanh", "ThresholdedRelu", "Tile", "TopK", "Transpose", "Trilu", "Unsqueeze",
    "Upsample", "Where", "Xor",
})  # fmt: skip


@dataclass
class CompatReport:
    """What the checker found; ``ok`` when TensorRT's parser should take the graph as it is."""

    problems: list[str] = field(default_factory=list)
    allowed_int64: list[str] = field(default_factory=list)  # constant int64 tensors (shapes, axes, K)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_tensorrt_compat(proto: onnx.ModelProto, batch_axis_only: bool = True) -> CompatReport:
    """Check one graph against the parser's op list, the dynamic-batch rule and the int64 rule."""
    report = CompatReport()
    graph = proto.graph
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or not TRT_OPSET_RANGE[0] <= opset <= TRT_OPSET_RANGE[1]:
        report.problems.append(f"opset {opset} is outside TensorRT 10's parser range {TRT_OPSET_RANGE}")
    for node in graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in TRT_ONNX_OPS:
            report.problems.append(f"op {node.domain + '::' if node.domain else ''}{node.op_type} ({node.name}) "
                                   "is not supported by TensorRT's ONNX parser")  # fmt: skip
    for value in [*graph.input, *graph.output]:
        dims = value.type.tensor_type.shape.dim
        for axis, dim in enumerate(dims):
            dynamic = not dim.HasField("dim_value")
            if dynamic and (axis != 0 or not batch_axis_only):
                report.problems.append(f"{value.name}: axis {axis} is dynamic; only the batch axis (0) may be")

    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *graph.input, *graph.output]}
    constant = {t.name for t in graph.initializer}
    for node in graph.node:  # nodes are topologically sorted: constness propagates forwards
        if all(not name or name in constant for name in node.input):
            constant.update(node.output)
    consumed = {name for node in graph.node for name in node.input} | {v.name for v in graph.output}
    for name, elem in types.items():
        if elem != onnx.TensorProto.INT64 or name not in consumed:  # e.g. TopK's unused indices
            continue
        (report.allowed_int64 if name in constant else report.problems).append(
            name if name in constant else f"{name}: int64 activation computed from a graph input (use int32)"
        )
    report.allowed_int64 += [t.name for t in graph.initializer if t.data_type == onnx.TensorProto.INT64]
    report.allowed_int64 = list(dict.fromkeys(report.allowed_int64))
    return report
