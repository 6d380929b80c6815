"""The TensorRT path without TensorRT: the parser-level graph check, the TensorRT 10/11 feature
detection against fake modules shaped like each API, engine and timing-cache keys through the
real exporter, and onnxruntime's TensorRT provider options.

The fakes stand in for a system library that cannot be installed here; they have the real
API's names (attributes present or absent per version) and record what the toolkit calls.
Nothing here shows that a real TensorRT builds or runs the engines: README, Unverified.
"""

from __future__ import annotations

import enum
import importlib.util
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from moleflow_edge.backbones import Backbone
from moleflow_edge.contract import Precision, load_manifest
from moleflow_edge.export import onnx_graphs, tensorrt_engine
from moleflow_edge.export.artifacts import ExportReport
from moleflow_edge.export.exporter import export_model
from moleflow_edge.export.precision import to_fp16, to_int8
from moleflow_edge.export.tensorrt_engine import (
    BuildTarget,
    EngineBuilder,
    EngineJob,
    TensorRTUnavailable,
    TimingCacheRejected,
    trtexec_command,
)
from moleflow_edge.export.trt_compat import check_tensorrt_compat
from moleflow_edge.model_store import ModelStore
from moleflow_edge.runtime import trt_api
from moleflow_edge.runtime.options import RuntimeOptions
from moleflow_edge.runtime.ort_backend import OrtBackend, trt_profile_options, with_trt_profile
from tests.export_fixture import TASKS


def _model(nodes: list, inputs: list, outputs: list, initializers: list | None = None) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=initializers or [])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _value(name: str, elem: int, shape: list | None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def _sample_shape(graph: onnx.ModelProto) -> tuple[int, ...]:
    return tuple(d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim[1:])


# --- the graph check ----------------------------------------------------------------------------------


def test_check_refuses_uint8_between_nodes_and_takes_a_cast_first_graph() -> None:
    images = _value("images", TensorProto.UINT8, ["batch", 4, 4, 3])
    out = _value("out", TensorProto.FLOAT, ["batch", 3, 4, 4])
    late = [helper.make_node("Transpose", ["images"], ["t"], perm=[0, 3, 1, 2], name="permute"),
            helper.make_node("Cast", ["t"], ["out"], to=TensorProto.FLOAT)]  # fmt: skip
    early = [helper.make_node("Cast", ["images"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Transpose", ["f"], ["out"], perm=[0, 3, 1, 2])]  # fmt: skip
    problems = "\n".join(check_tensorrt_compat(_model(late, [images], [out])).problems)
    assert "t: Transpose (permute) produces uint8" in problems
    assert "Transpose (permute): input 'images' is uint8" in problems
    assert check_tensorrt_compat(_model(early, [images], [out])).ok


def test_check_flags_unsupported_ops_dynamic_axes_and_types_an_op_does_not_take() -> None:
    x = _value("x", TensorProto.FLOAT, ["batch", "n"])
    y = _value("y", TensorProto.FLOAT, ["batch", "n"])
    z = _value("z", TensorProto.INT64, ["batch", 2])
    weights = helper.make_tensor("w", TensorProto.INT64, [2, 2], [1, 0, 0, 1])
    nodes = [
        helper.make_node("Det", ["x"], ["d"]),  # not in the parser's matrix
        helper.make_node("Relu", ["x"], ["y"]),
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Reshape", ["s", "two"], ["s2"]),
        helper.make_node("MatMul", ["s2", "w"], ["z"]),  # MatMul takes no int64
    ]
    two = helper.make_tensor("two", TensorProto.INT64, [2], [1, 2])
    report = check_tensorrt_compat(_model(nodes, [x], [y, z], [weights, two]))
    text = "\n".join(report.problems)
    assert "op Det" in text and "y: axis 1 is dynamic" in text
    assert "MatMul (unnamed): input 's2' is int64" in text
    assert "Reshape" not in text and "Shape (" not in text  # int64 shapes are fine in TensorRT 10


def _qdq(data_type: int, zero: list[int], values: list[int]) -> onnx.ModelProto:
    weight = helper.make_tensor("w_q", data_type, [2], values)
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [], [0.5])
    zero_point = helper.make_tensor("zero", data_type, [], zero)
    node = helper.make_node("DequantizeLinear", ["w_q", "scale", "zero"], ["w"], name="dq")
    add = helper.make_node("Add", ["x", "w"], ["y"])
    return _model([node, add], [_value("x", TensorProto.FLOAT, ["batch", 2])],
                  [_value("y", TensorProto.FLOAT, ["batch", 2])], [weight, scale, zero_point])  # fmt: skip


def test_check_takes_int8_qdq_and_refuses_int32_biases_and_nonzero_zero_points() -> None:
    assert check_tensorrt_compat(_qdq(TensorProto.INT8, [0], [3, -3])).ok
    int32 = "\n".join(check_tensorrt_compat(_qdq(TensorProto.INT32, [0], [3, -3])).problems)
    assert "DequantizeLinear (dq): input 'w_q' is int32" in int32
    shifted = "\n".join(check_tensorrt_compat(_qdq(TensorProto.INT8, [2], [3, -3])).problems)
    assert "the zero point must be a constant 0" in shifted


@pytest.mark.parametrize(
    ("node", "expected"),
    [
        (helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="cubic"), "mode='cubic' is not supported"),
        (helper.make_node("TopK", ["x", "k"], ["y", "i"], sorted=0), "sorted must be 1"),
        (helper.make_node("ReduceSum", ["x", "axes_input"], ["y"]), "'axes_input' must be an initializer"),
        (helper.make_node("MaxPool", ["x"], ["y", "indices"], kernel_shape=[1, 1]), "the Indices output"),
        (helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[1, 1], dilations=[2, 2]), "dilations"),
    ],
)
def test_check_enforces_the_restrictions_column(node: onnx.NodeProto, expected: str) -> None:
    """Each op is otherwise legal: only the restriction named in the parser's matrix is broken."""
    x = _value("x", TensorProto.FLOAT, ["batch", 3, 4, 4])
    axes = _value("axes_input", TensorProto.INT64, [1])
    constants = [helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 2, 2]),
                 helper.make_tensor("k", TensorProto.INT64, [1], [2])]  # fmt: skip
    outputs = [_value(name, TensorProto.FLOAT if name == "y" else TensorProto.INT64, None) for name in node.output]
    inputs = [x, axes] if "axes_input" in node.input else [x]
    report = check_tensorrt_compat(_model([node], inputs, outputs, constants))
    assert len(report.problems) == 1 and expected in report.problems[0], report.problems


def test_the_backbone_graph_fails_with_uint8_reordering_and_passes_cast_first_in_every_precision(
    built: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The issue's "done when": the check catches the graph that preprocessing made before the fix
    (permute and flip on the uint8 frame), and takes today's in fp32, fp16 and INT8 (QDQ)."""
    model, _ = ModelStore(built["model_dir"]).load()
    today = onnx_graphs.backbone_graph(model)
    calibration = np.random.default_rng(0).integers(0, 256, (8, *_sample_shape(today)), dtype=np.uint8)
    for graph in (today, to_fp16(today), to_int8(today, calibration)):
        report = check_tensorrt_compat(graph)
        assert report.ok, report.problems

    def uint8_first(self: Backbone, images_bgr: object) -> object:
        x = images_bgr.permute(0, 3, 1, 2).flip(1).float()  # type: ignore[attr-defined]
        return (x - self.mean) / self.std

    monkeypatch.setattr(Backbone, "normalise", uint8_first)
    before = check_tensorrt_compat(onnx_graphs.backbone_graph(model))
    assert not before.ok
    assert any("produces uint8" in p and "Transpose" in p for p in before.problems), before.problems


# --- TensorRT 10 / 11 feature detection, on fakes shaped like each API -----------------------------------


class _DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    INT64 = 6


class FakeConfig:
    """IBuilderConfig: records flags and profiles; timing caches are bytes with a version header."""

    def __init__(self, trt: FakeTensorRT) -> None:
        self.trt, self.flags, self.profiles, self.cache = trt, [], [], None

    def set_memory_pool_limit(self, pool: str, size: int) -> None:
        self.trt.calls.append(("workspace", size))

    def set_flag(self, flag: object) -> None:
        self.flags.append(flag)

    def create_timing_cache(self, data: bytes) -> object:
        return SimpleNamespace(data=data or self.trt.header, serialize=lambda: data or self.trt.header)

    def set_timing_cache(self, cache: SimpleNamespace, ignore_mismatch: bool) -> bool:
        accepted = cache.data.startswith(self.trt.header) and not ignore_mismatch
        self.cache = cache if accepted else self.cache
        return accepted

    def get_timing_cache(self) -> SimpleNamespace:
        return SimpleNamespace(serialize=lambda: self.cache.data + b"+timings")

    def add_optimization_profile(self, profile: SimpleNamespace) -> None:
        self.profiles.append(profile.shapes)


class FakeBuilder:
    def __init__(self, trt: FakeTensorRT) -> None:
        self.trt = trt

    def create_network(self, flags: int) -> SimpleNamespace:
        self.trt.calls.append(("network_flags", flags))
        return SimpleNamespace(path=None)

    def create_builder_config(self) -> FakeConfig:
        self.trt.configs.append(FakeConfig(self.trt))
        return self.trt.configs[-1]

    def create_optimization_profile(self) -> SimpleNamespace:
        profile = SimpleNamespace(shapes={})
        profile.set_shape = lambda name, low, opt, high: profile.shapes.update({name: (low, opt, high)})
        return profile

    def build_serialized_network(self, network: SimpleNamespace, config: FakeConfig) -> bytes:
        return f"plan:{network.path}:{config.profiles}".encode()


class FakeTensorRT(SimpleNamespace):
    """A ``tensorrt`` module: TensorRT 10 keeps BuilderFlag.FP16/INT8 and STRONGLY_TYPED; 11 drops
    the precision flags (and may drop STRONGLY_TYPED, which it ignores)."""

    def __init__(self, version: str, precision_flags: bool, strongly_typed: bool) -> None:
        flags = {"FP16": "fp16", "INT8": "int8"} if precision_flags else {}
        super().__init__(
            __version__=version,
            header=f"trt{version}".encode(),
            calls=[],
            configs=[],
            BuilderFlag=SimpleNamespace(TF32="tf32", **flags),
            NetworkDefinitionCreationFlag=SimpleNamespace(**({"STRONGLY_TYPED": 0} if strongly_typed else {})),
            MemoryPoolType=SimpleNamespace(WORKSPACE="workspace"),
            DataType=_DataType,
            Logger=type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None}),
        )
        self.Builder = lambda logger: FakeBuilder(self)
        self.OnnxParser = FakeParser


class FakeParser:
    num_errors = 0

    def __init__(self, network: SimpleNamespace, logger: object) -> None:
        self.network = network

    def parse_from_file(self, path: str) -> bool:
        self.network.path = Path(path).name
        return True


TRT10 = ("10.3.0", True, True)
TRT11 = ("11.1.0", False, True)
TRT11_WITHOUT_FLAG = ("11.4.0", False, False)


@pytest.mark.parametrize(("shape", "flags"), [(TRT10, 1), (TRT11, 1), (TRT11_WITHOUT_FLAG, 0)])
def test_builder_makes_strongly_typed_networks_and_never_sets_a_precision_flag(
    shape: tuple, flags: int, tmp_path: Path
) -> None:
    trt = FakeTensorRT(*shape)
    builder = EngineBuilder(trt, tmp_path / "timing.cache", workspace_bytes=1 << 28)
    for precision in Precision:
        job = EngineJob(tmp_path / f"g.{precision.value}.onnx", tmp_path / f"{precision.value}.engine", "embedding",
                        (64, 8, 8), precision, (1, 2, 8))  # fmt: skip
        builder.build(job)
        assert job.engine_path.read_bytes().startswith(f"plan:g.{precision.value}.onnx".encode())
    assert [c for c in trt.calls if c[0] == "network_flags"] == [("network_flags", flags)] * 3
    assert all(config.flags == [] for config in trt.configs)  # fp16 / QDQ graphs carry their own precision
    assert trt.configs[0].profiles == [{"embedding": ((1, 64, 8, 8), (2, 64, 8, 8), (8, 64, 8, 8))}]
    assert ("workspace", 1 << 28) in trt.calls


def test_builder_refuses_tensorrt_before_10(tmp_path: Path) -> None:
    with pytest.raises(trt_api.TensorRTVersionError, match="TensorRT 8.6.1 is too old.*opset 18"):
        EngineBuilder(FakeTensorRT("8.6.1", True, False), tmp_path / "timing.cache")


def test_a_rejected_timing_cache_warns_names_the_file_and_is_replaced(tmp_path: Path) -> None:
    cache = tmp_path / "engines" / "timing" / "trt10.3.0.sm87.cuda12.6.cache"
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"trt9.0.0 timings of another TensorRT")
    builder = EngineBuilder(FakeTensorRT(*TRT10), cache)
    job = EngineJob(tmp_path / "g.onnx", tmp_path / "g.engine", "images", (8, 8, 3), Precision.FP32, (1, 1, 4))
    with pytest.warns(TimingCacheRejected, match=f"rejected the timing cache {cache}"):
        builder.build(job)
    assert cache.read_bytes() == b"trt10.3.0+timings"  # a fresh cache from this TensorRT
    builder.build(job)  # the new cache is accepted: no warning, and the saved timings are read back
    assert builder.trt.configs[-1].cache.data == b"trt10.3.0+timings"


@pytest.mark.parametrize(
    ("engine", "expected"),
    [
        (SimpleNamespace(device_memory_size=4096), 4096),  # TensorRT 10.0: no v2 yet
        (SimpleNamespace(device_memory_size_v2=0, device_memory_size=4096), 0),  # 10.x: v2 may be 0
        (SimpleNamespace(device_memory_size_v2=0), 0),  # 11: the old attribute is gone
        (SimpleNamespace(device_memory_size_v2=2048), 2048),
    ],
)
def test_device_memory_reads_v2_even_when_it_is_zero(engine: SimpleNamespace, expected: int) -> None:
    assert trt_api.device_memory_bytes(engine) == expected


def test_tensor_types_map_to_numpy_without_trt_nptype() -> None:
    trt = FakeTensorRT(*TRT11)
    assert not hasattr(trt, "nptype")
    assert trt_api.numpy_dtype(trt, _DataType.HALF) == np.float16
    assert trt_api.numpy_dtype(trt, _DataType.UINT8) == np.uint8
    with pytest.raises(TypeError, match="no numpy equivalent"):
        trt_api.numpy_dtype(trt, 99)


def test_trtexec_lines_carry_no_precision_flags_and_type_strongly_only_before_11(tmp_path: Path) -> None:
    job = EngineJob(tmp_path / "flow" / "a.int8.onnx", tmp_path / "a.engine", "embedding", (64, 8, 8),
                    Precision.INT8, (1, 2, 8))  # fmt: skip
    ten, eleven = trtexec_command(job, tmp_path / "c", 10), trtexec_command(job, tmp_path / "c", 11)
    for line in (ten, eleven):
        assert "--fp16" not in line and "--int8" not in line and "--best" not in line
        assert "--minShapes=embedding:1x64x8x8 --optShapes=embedding:2x64x8x8 --maxShapes=embedding:8x64x8x8" in line
        assert "--memPoolSize=workspace:1024" in line
    assert ten.endswith(" --stronglyTyped") and "--stronglyTyped" not in eleven
    assert trtexec_command(job, tmp_path / "c") == ten  # version unknown: JetPack 6's TensorRT 10


# --- engines through the real exporter, with the fake TensorRT ---------------------------------------------


def _engine_export(out: Path, built: dict, batch: tuple[int, int, int], target: BuildTarget) -> ExportReport:
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "tensorrt", FakeTensorRT(target.trt_version, True, True))
        patch.setattr(tensorrt_engine, "build_target", lambda trt, device_id: target)
        return export_model(built["model_dir"], out, precisions=["fp32"], fmt="engine", batch_profile=batch)


def test_engines_are_reused_only_while_nothing_that_shapes_them_changed(built: dict, tmp_path: Path) -> None:
    out = tmp_path / "export"
    shutil.copytree(built["export_dir"], out)
    orin = BuildTarget("10.3.0", "87", "12.6")
    first = _engine_export(out, built, (1, 1, 8), orin)
    engines = [f for f in first.written if f.file.endswith(".engine")]
    assert len(engines) == 1 + len(TASKS) + 1  # backbone, each task, router
    again = _engine_export(out, built, (1, 1, 8), orin)
    assert not [f for f in again.written if f.file.endswith(".engine")]

    wider = _engine_export(out, built, (1, 4, 16), orin)  # a changed batch profile rebuilds every engine
    rebuilt = {f.file for f in wider.written if f.file.endswith(".engine")}
    assert len(rebuilt) == len(engines) and rebuilt.isdisjoint(f.file for f in engines)
    assert not any((out / f.file).exists() for f in engines)  # replaced engines are removed
    manifest = load_manifest(out)
    entry = manifest.engines["backbone.fp32/trt10.3.0.sm87"]
    assert entry.batch_profile == [1, 4, 16] and entry.workspace_bytes == 1 << 30
    assert b"'images': ((1, 128, 128, 3), (4, 128, 128, 3), (16, 128, 128, 3))" in (out / entry.file).read_bytes()
    assert trt_api.batch_profile(manifest, Precision.FP32) == (1, 4, 16)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tensorrt_engine, "WORKSPACE_BYTES", 1 << 29)
        smaller = _engine_export(out, built, (1, 4, 16), orin)
    assert len([f for f in smaller.written if f.file.endswith(".engine")]) == len(engines)

    desktop = BuildTarget("10.3.0", "89", "12.6")  # another GPU: its own engines and timing cache
    _engine_export(out, built, (1, 4, 16), desktop)
    keys = set(load_manifest(out).engines)
    assert {"backbone.fp32/trt10.3.0.sm87", "backbone.fp32/trt10.3.0.sm89", "router/trt10.3.0.sm89"} <= keys
    caches = sorted(p.name for p in (out / "engines" / "timing").iterdir())
    assert caches == ["trt10.3.0.sm87.cuda12.6.cache", "trt10.3.0.sm89.cuda12.6.cache"]


def test_engine_export_without_tensorrt_says_what_to_install_and_gives_trtexec_lines(
    built: dict, tmp_path: Path
) -> None:
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here: the engine path builds instead of failing")
    out = tmp_path / "out"
    shutil.copytree(built["export_dir"], out)
    with pytest.raises(TensorRTUnavailable) as caught:
        export_model(built["model_dir"], out, precisions=("fp32", "int8"), fmt="engine", calib_data=built["data"])
    message = str(caught.value)
    assert "pip install 'moleflow-edge[tensorrt]'" in message and "drop --stronglyTyped" in message
    assert f"trtexec --onnx={out / load_manifest(out).backbone_graphs['int8'].file} --saveEngine=" in message
    assert "--minShapes=images:1x128x128x3 --optShapes=images:1x128x128x3 --maxShapes=images:8x128x128x3" in message
    assert "--fp16" not in message and "--int8" not in message
    assert load_manifest(out).engines == {}  # graphs intact, no engine recorded


# --- onnxruntime's TensorRT provider ---------------------------------------------------------------------


def test_trt_profile_options_cover_the_batch_profile_for_one_input() -> None:
    options = trt_profile_options("embedding", (64, 8, 8), (1, 2, 8))
    assert options == {"trt_profile_min_shapes": "embedding:1x64x8x8", "trt_profile_opt_shapes": "embedding:2x64x8x8",
                       "trt_profile_max_shapes": "embedding:8x64x8x8"}  # fmt: skip
    providers = [("TensorrtExecutionProvider", {"device_id": 0}), ("CUDAExecutionProvider", {}), "CPUExecutionProvider"]
    added = with_trt_profile(providers, options)
    assert added[0] == ("TensorrtExecutionProvider", {"device_id": 0, **options}) and added[1:] == providers[1:]


def test_each_session_gets_its_own_input_profile_and_the_engine_cache(
    built: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """onnxruntime here has no TensorRT provider: the options it would get are recorded, and the
    sessions run on the CPU."""
    seen: list[tuple[str, list]] = []
    real = ort.InferenceSession

    def recording(path: str, options: ort.SessionOptions, providers: list) -> ort.InferenceSession:
        seen.append((Path(path).name, providers))
        return real(path, options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["TensorrtExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", recording)
    root = tmp_path / "export"  # the provider's engine cache is written into the export
    shutil.copytree(built["export_dir"], root)
    manifest = load_manifest(root)
    providers = ("TensorrtExecutionProvider", "CPUExecutionProvider")
    backend = OrtBackend(root, manifest, RuntimeOptions("onnxruntime", "fp32", providers=providers, io_binding=True))
    backend.load_detector(manifest.task(TASKS[0]))
    by_graph = {name: dict(providers[0][1]) for name, providers in seen}
    backbone, router = manifest.backbone_graphs["fp32"], manifest.router_graph
    assert router is not None
    s, d, g = manifest.image_size, manifest.embed_dim, manifest.grid
    assert by_graph[Path(backbone.file).name]["trt_profile_max_shapes"] == f"images:8x{s}x{s}x3"
    assert by_graph[Path(router.file).name]["trt_profile_min_shapes"] == f"routing_feature:1x{manifest.routing_dim}"
    flow = by_graph[Path(manifest.task(TASKS[0]).graphs["fp32"].file).name]
    assert flow["trt_profile_opt_shapes"] == f"embedding:1x{d}x{g}x{g}"
    assert flow["trt_engine_cache_enable"] and flow["trt_engine_cache_path"] == str(root / "engines" / "ort_trt_cache")
