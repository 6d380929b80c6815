"""Export: merged flows equal the model, ONNX graphs reproduce PyTorch, the export directory
is incremental and crash-safe, and every graph stays inside what TensorRT's parser takes.

One small model (3 synthetic tasks) is trained and exported once per module; the export is
built the way a line grows (two tasks, an interrupted attempt at a third, then the third), and
each test checks one observation of that history.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from moleflow_edge.config import DetectorKind, MoleFlowConfig, Whitening
from moleflow_edge.contract import Manifest, ManifestError, Precision, file_sha256, load_manifest
from moleflow_edge.data.mvtec import Split, load_split
from moleflow_edge.data.synth import generate
from moleflow_edge.detectors.flow.lora import LoRALinear
from moleflow_edge.detectors.flow.merged import merge_task
from moleflow_edge.detectors.flow.parts import flow_parts, patch_scores, top_k_mean
from moleflow_edge.export import onnx_graphs
from moleflow_edge.export.artifacts import ExportError, ExportReport
from moleflow_edge.export.exporter import export_model
from moleflow_edge.export.trt_compat import check_tensorrt_compat
from moleflow_edge.metrics import auroc
from moleflow_edge.model.continual_model import ContinualModel
from moleflow_edge.model_store import ModelStore
from moleflow_edge.router import RouterTable
from moleflow_edge.targets import ExportFormat, check_export_args
from moleflow_edge.train import train_task

TASKS = ["weave", "tiles", "screw"]
FIRST, LAST = TASKS[:2], TASKS[2]
PRECISIONS = ("fp32", "fp16", "int8")
CONFIG = MoleFlowConfig(image_size=128, embed_dim=64).with_settings(
    "flow", num_mole_blocks=2, num_dia_blocks=1, lora_rank=8, lora_alpha=8, max_steps=60, batch_size=8
)


@dataclass
class Trained:
    data: Path
    model_dir: Path
    model: ContinualModel
    tests: dict[str, Split]


@dataclass
class History:
    """An export directory and what was observed while it grew."""

    out: Path
    first: ExportReport
    before_interrupt: dict[str, str]
    interrupted_error: str
    after_interrupt: dict[str, str]
    tasks_after_interrupt: list[str]
    staging_left: list[str]
    third: ExportReport
    after_third: dict[str, str]
    again: ExportReport


def _hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): file_sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    root = tmp_path_factory.mktemp("export_model")
    data, model_dir = root / "data", root / "model"
    # 40 good and 12 per defect kind: with fewer, one swapped pair moves AUROC by more than 0.005,
    # and the precision comparisons would measure the test set's granularity, not the graphs
    generate(data, categories=TASKS, seed=0, image_size=128, n_train=30, n_test_good=40, n_test_defect=12)
    for task in TASKS:
        train_task(data, task, model_dir, CONFIG, progress=False)
    model, _ = ModelStore(model_dir).load()
    return Trained(data, model_dir, model, {t: load_split(data, t, "test", CONFIG.image_size) for t in TASKS})


@pytest.fixture(scope="module")
def history(trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> History:
    out = tmp_path_factory.mktemp("export") / "out"
    first = export_model(trained.model_dir, out, tasks=FIRST, precisions=PRECISIONS, calib_data=trained.data)
    before = _hashes(out)

    def interrupted(*args: object, **kwargs: object) -> onnx.ModelProto:
        raise KeyboardInterrupt("interrupted while exporting the detector graph")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(onnx_graphs, "scorer_graph", interrupted)
        with pytest.raises(KeyboardInterrupt) as caught:
            export_model(trained.model_dir, out, tasks=[LAST])
    after_interrupt = _hashes(out)
    tasks_after_interrupt = load_manifest(out).task_names  # verifies every file's hash
    staging = [p.name for p in out.iterdir() if p.name.startswith(".staging")]
    third = export_model(trained.model_dir, out, tasks=[LAST], precisions=PRECISIONS, calib_data=trained.data)
    after_third = _hashes(out)
    again = export_model(trained.model_dir, out, precisions=PRECISIONS, calib_data=trained.data)
    return History(
        out,
        first,
        before,
        str(caught.value),
        after_interrupt,
        tasks_after_interrupt,
        staging,
        third,
        after_third,
        again,
    )


def _session(path: Path, reference_qdq: bool = False) -> ort.InferenceSession:
    """onnxruntime CPU session. ``reference_qdq`` runs Q/DQ nodes as written (no fusion), which is
    the arithmetic TensorRT performs: onnxruntime's fused u8s8 kernels saturate int16 sums on
    x86 CPUs without VNNI (this machine: AVX2 only) and would measure that instead."""
    options = ort.SessionOptions()
    if reference_qdq:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _scores(out: Path, manifest: Manifest, precision: str, task: str, images: np.ndarray) -> tuple[np.ndarray, ...]:
    """backbone graph -> flow graph: (patch scores, image scores, routing feature)."""
    qdq = precision == "int8"
    backbone = _session(out / manifest.backbone_graphs[precision].file, qdq)
    embedding, routing = backbone.run(None, {"images": images})
    flow = _session(out / manifest.task(task).graphs[precision].file, qdq)
    patch, image = flow.run(None, {"embedding": embedding})
    return patch, image, routing


# --- merge ------------------------------------------------------------------------------------------


def test_merged_flow_equals_the_model_with_its_adapters(trained: Trained) -> None:
    model = trained.model
    images = torch.from_numpy(trained.tests["screw"].images)
    with torch.no_grad():
        embedded = model.embed(model.patch_concat(model.backbone_maps(images)))
        for task in TASKS:
            reference = patch_scores(model, embedded, task)
            patch, image = merge_task(model, task)(embedded)
            assert torch.allclose(patch, reference, rtol=1e-5, atol=0)
            assert torch.allclose(image, top_k_mean(reference, model.config.top_k), rtol=1e-5, atol=0)


def test_merged_graph_has_no_more_matrix_products_than_the_base_flow(history: History, trained: Trained) -> None:
    model = trained.model
    manifest = load_manifest(history.out)
    for task in TASKS:
        base = [*([model.mixer] if model.mixer is not None else []), *model.mole_blocks, *flow_parts(model, task).dia]
        products = sum(isinstance(m, (torch.nn.Conv2d, LoRALinear)) for part in base for m in part.modules())
        products += (
            model.config.section(DetectorKind.FLOW).whitening is Whitening.MAHALANOBIS
        )  # the eager whitener's one product
        graph = onnx.load(history.out / manifest.task(task).graphs["fp32"].file).graph
        ops = [node.op_type for node in graph.node]
        assert sum(op in ("Conv", "MatMul", "Gemm") for op in ops) == products
        assert "Sigmoid" not in ops  # gates folded into constants


# --- graph contract and TensorRT compatibility ------------------------------------------------------


def test_graphs_have_the_contract_names_types_and_only_a_dynamic_batch(history: History) -> None:
    manifest = load_manifest(history.out)
    s, d, g = manifest.image_size, manifest.embed_dim, manifest.grid
    expected = {
        "images": (onnx.TensorProto.UINT8, ["batch", s, s, 3]),
        "embedding": (onnx.TensorProto.FLOAT, ["batch", d, g, g]),
        "routing_feature": (onnx.TensorProto.FLOAT, ["batch", manifest.routing_dim]),
        "patch_scores": (onnx.TensorProto.FLOAT, ["batch", g, g]),
        "image_score": (onnx.TensorProto.FLOAT, ["batch"]),
        "distances": (onnx.TensorProto.FLOAT, ["batch", len(TASKS)]),
    }
    for artifact in [*manifest.backbone_graphs.values(), manifest.router_graph]:
        assert artifact is not None
        io = onnx_graphs.graph_io(onnx.load(history.out / artifact.file))
        assert io == {name: expected[name] for name in io}
    for task in TASKS:
        for artifact in manifest.task(task).graphs.values():
            io = onnx_graphs.graph_io(onnx.load(history.out / artifact.file))
            assert io == {name: expected[name] for name in ("embedding", "patch_scores", "image_score")}


def test_every_exported_graph_passes_the_tensorrt_check(history: History) -> None:
    graphs = sorted(history.out.rglob("*.onnx"))
    assert len(graphs) == 3 + 1 + 3 * len(TASKS)
    for path in graphs:
        report = check_tensorrt_compat(onnx.load(path))
        assert report.ok, (path.name, report.problems)


# --- parity with PyTorch ------------------------------------------------------------------------------


def test_fp32_graphs_reproduce_pytorch_scores_routing_and_auroc(history: History, trained: Trained) -> None:
    manifest = load_manifest(history.out)
    _, prototypes = ModelStore(trained.model_dir).load()
    table = RouterTable(TASKS, [prototypes[t] for t in TASKS])
    router = _session(history.out / manifest.router_graph.file)  # type: ignore[union-attr]
    model = trained.model
    for task, split in trained.tests.items():
        with torch.no_grad():
            maps = model.backbone_maps(torch.from_numpy(split.images))
            reference_patch = patch_scores(model, model.embed(model.patch_concat(maps)), task)
            reference_image = top_k_mean(reference_patch, model.config.top_k)
            torch_routing = model.routing_feature(maps).numpy()
        patch, image, routing = _scores(history.out, manifest, "fp32", task, split.images)
        np.testing.assert_allclose(patch, reference_patch.numpy(), rtol=1e-4, atol=0)
        assert auroc(split.labels, image) == auroc(split.labels, reference_image.numpy())
        expected = np.argmin(table.distances(torch_routing), axis=1)
        np.testing.assert_array_equal(np.argmin(router.run(None, {"routing_feature": routing})[0], axis=1), expected)
        np.testing.assert_array_equal(np.argmin(table.distances(routing), axis=1), expected)


@pytest.mark.parametrize(
    ("precision", "mean_tolerance", "task_tolerance"), [("fp16", 0.005, 0.005), ("int8", 0.01, 0.02)]
)
def test_lower_precision_keeps_image_auroc(
    history: History, trained: Trained, precision: str, mean_tolerance: float, task_tolerance: float
) -> None:
    """fp16 holds every task within 0.005. INT8 holds the mean over tasks within 0.01 but not
    every task: on the weakest one (screw, fp32 AUROC 0.69-0.78, scores nearly tied) it moved
    by 0.0005-0.0172 across training runs, from the backbone graph in some runs and the flow
    graph in others; hence 0.02 per task (see benchmarks/README.md)."""
    manifest = load_manifest(history.out)
    deltas = []
    for task, split in trained.tests.items():
        fp32 = auroc(split.labels, _scores(history.out, manifest, "fp32", task, split.images)[1])
        lower = auroc(split.labels, _scores(history.out, manifest, precision, task, split.images)[1])
        deltas.append(lower - fp32)
    assert abs(np.mean(deltas)) <= mean_tolerance, deltas
    assert max(abs(d) for d in deltas) <= task_tolerance, deltas


def test_int8_calibration_is_recorded(history: History) -> None:
    calibration = load_manifest(history.out).int8_calibration
    assert calibration["backbone"]["count"] == 30 * len(TASKS)
    assert {calibration[f"detectors/{t}"]["count"] for t in TASKS} == {30}
    assert len({calibration[f"detectors/{t}"]["files_sha256"] for t in TASKS}) == len(TASKS)


# --- incremental, atomic, verified ---------------------------------------------------------------------


def test_adding_a_task_touches_no_other_task_and_no_fp_backbone(history: History) -> None:
    before, after = history.before_interrupt, history.after_third
    others = [name for name in before if name.startswith("detectors/")]
    assert others and all(after[name] == before[name] for name in others)
    skipped = {f.file for f in history.third.files if f.skipped}
    written = {f.file for f in history.third.written}
    assert {"backbone.fp32.onnx", "backbone.fp16.onnx"} <= skipped and not written.intersection(others)
    assert {f"detectors/{LAST}.{p}.onnx" for p in PRECISIONS} <= written
    manifest = load_manifest(history.out)
    assert manifest.task_names == TASKS
    assert "router.onnx" in written and "backbone.int8.onnx" in written  # INT8 recalibrated on every task


def test_interrupted_export_leaves_the_previous_export_valid(history: History) -> None:
    assert "detector graph" in history.interrupted_error
    assert history.after_interrupt == history.before_interrupt
    assert history.tasks_after_interrupt == FIRST
    assert history.staging_left == []


def test_reexporting_unchanged_tasks_is_a_no_op(history: History) -> None:
    assert history.again.files and not history.again.written and not history.again.removed
    assert _hashes(history.out) == history.after_third


def test_distance_limit_defaults_to_the_training_prototype_limit(history: History, trained: Trained) -> None:
    _, prototypes = ModelStore(trained.model_dir).load()
    manifest = load_manifest(history.out)
    for task in TASKS:
        assert manifest.task(task).distance_limit == pytest.approx(prototypes[task].limit)


def test_router_weights_are_readable_without_torch(history: History, trained: Trained) -> None:
    from safetensors.numpy import load_file

    _, prototypes = ModelStore(trained.model_dir).load()
    tensors = load_file(str(history.out / load_manifest(history.out).router_file.file))  # type: ignore[union-attr]
    for task in TASKS:
        np.testing.assert_array_equal(tensors[f"{task}.mean"], prototypes[task].mean)
        np.testing.assert_array_equal(tensors[f"{task}.whitener"], prototypes[task].whitener)


def test_tampered_file_is_refused_with_a_clear_message(history: History, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(history.out, copy)
    target = copy / load_manifest(copy).task(LAST).graphs["fp32"].file
    target.write_bytes(target.read_bytes()[:-1] + b"\0")
    with pytest.raises(ManifestError, match=rf"{LAST}\.fp32\.[0-9a-f]{{16}}\.onnx does not match the manifest"):
        load_manifest(copy)


def test_missing_graph_is_rebuilt_alone_and_a_graph_over_the_size_cap_gets_a_listed_data_file(
    history: History, trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Protobuf caps a graph at 2 GiB; a bigger one (not reached by these models) is written with
    external data, which the manifest lists and hashes like the graph itself."""
    out = tmp_path / "out"
    shutil.copytree(history.out, out)
    (out / load_manifest(out, verify=False).task(LAST).graphs["fp32"].file).unlink()
    monkeypatch.setattr(onnx_graphs, "MAX_PROTO_BYTES", 0)
    report = export_model(trained.model_dir, out, tasks=[LAST])
    assert [f.file for f in report.written] == [f"detectors/{LAST}.fp32.onnx"]
    graph = load_manifest(out).task(LAST).graphs["fp32"]
    # content-addressed graph; its weights file keeps the run-unique name written inside the graph
    assert graph.file == f"detectors/{LAST}.fp32.{graph.sha256[:16]}.onnx"
    assert graph.data_file.startswith(f"detectors/{LAST}.fp32.") and graph.data_file.endswith(".onnx.data")
    assert (out / graph.data_file).is_file()
    patch = _session(out / graph.file).run(None, {"embedding": np.zeros((1, 64, 8, 8), np.float32)})[0]
    assert patch.shape == (1, 8, 8)
    (out / graph.data_file).write_bytes(b"tampered")
    with pytest.raises(ManifestError, match="does not match the manifest"):
        load_manifest(out)


# --- arguments and the engine path --------------------------------------------------------------------


def test_format_table_checks_arguments() -> None:
    assert check_export_args("engine", ["fp16", "fp16"]) == (ExportFormat.ENGINE, (Precision.FP16,))
    with pytest.raises(ValueError, match="unknown export format 'tflite'"):
        check_export_args("tflite", ["fp32"])
    with pytest.raises(ValueError, match="unknown precision 'int4'"):
        check_export_args("onnx", ["int4"])


def test_int8_without_calibration_data_is_refused(trained: Trained, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="--calib-data"):
        export_model(trained.model_dir, tmp_path / "out", precisions=["int8"])


def test_unknown_task_is_refused(trained: Trained, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"tasks \['cable'\] are not trained"):
        export_model(trained.model_dir, tmp_path / "out", tasks=["cable"])
