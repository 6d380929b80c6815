"""Two detector kinds under one router: memory and flow tasks learned alternately, exported and run.

One model learns a memory task, a flow task, then a memory task; earlier tasks must stay bit for bit
as they were, the router must tell all three apart, and the export must score through the torch-free
runtime as the torch side scores. The coreset and the memory graph are checked on their own.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from moleflow_edge.config import DetectorKind
from moleflow_edge.contract import DETECTOR_DIR, MANIFEST_FILE, load_manifest
from moleflow_edge.data.mvtec import load_split
from moleflow_edge.data.synth import generate
from moleflow_edge.detectors.memory.bank import MemoryScorer
from moleflow_edge.detectors.memory.coreset import PARTITION_FROM, coreset_size, extend_coreset, greedy_coreset
from moleflow_edge.detectors.registry import kind_of
from moleflow_edge.evaluate import evaluate
from moleflow_edge.export import onnx_graphs
from moleflow_edge.export.exporter import export_model
from moleflow_edge.export.trt_compat import check_tensorrt_compat
from moleflow_edge.features import extract_features
from moleflow_edge.model_store import SHARED_FILE, TASK_LIST_FILE, ModelStore
from moleflow_edge.router import UNKNOWN
from moleflow_edge.runtime import Runtime, RuntimeOptions
from moleflow_edge.train import train_task
from tests.conftest import TINY_CONFIG

SEQUENCE = [("weave", DetectorKind.MEMORY), ("tiles", DetectorKind.FLOW), ("cap", DetectorKind.MEMORY)]
UNTRAINED = "screw"
CONFIG = TINY_CONFIG.with_settings("memory", coreset_min=200, coreset_max=600)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """memory, flow, memory learned in that order; the model folder's files after each task."""
    base = tmp_path_factory.mktemp("mixed")
    data, model_dir = base / "data", base / "model"
    generate(
        data, [t for t, _ in SEQUENCE] + [UNTRAINED], seed=0, image_size=128, n_train=20, n_test_good=8, n_test_defect=3
    )
    after = []
    for task, kind in SEQUENCE:
        report = train_task(data, task, model_dir, CONFIG, steps=12, progress=False, detector=kind)
        assert report.detector is kind
        after.append(_files(model_dir))
    export_model(model_dir, base / "export", precisions=("fp32", "fp16"))
    return {"data": data, "model_dir": model_dir, "export_dir": base / "export", "after": after}


def test_earlier_tasks_are_bit_identical_whatever_the_kinds(mixed: dict) -> None:
    final = mixed["after"][-1]
    for i, files in enumerate(mixed["after"][:-1]):
        for name, content in files.items():
            if name != TASK_LIST_FILE:
                assert final[name] == content, f"{name} changed after task {i}"
    store = ModelStore(mixed["model_dir"])
    assert store.kinds() == dict(SEQUENCE)
    assert json.loads((mixed["model_dir"] / TASK_LIST_FILE).read_text())["detectors"] == {
        t: k.value for t, k in SEQUENCE
    }


def test_a_memory_task_first_still_trains_the_shared_flow_parts(mixed: dict) -> None:
    """Task 0 is a memory task, yet the flow learned after it stands on trained shared weights."""
    from moleflow_edge.train import prepare_model

    torch.manual_seed(CONFIG.seed)
    untrained = prepare_model(ModelStore(mixed["model_dir"] / "nothing-here"), CONFIG).shared_state_dict()
    trained = ModelStore(mixed["model_dir"]).load()[0].shared_state_dict()
    assert (mixed["model_dir"] / SHARED_FILE).is_file()
    assert untrained.keys() == trained.keys()
    assert any(not torch.equal(untrained[k], trained[k]) for k in trained)


def test_mixed_kinds_are_routed_and_detect(mixed: dict) -> None:
    results = evaluate(mixed["data"], mixed["model_dir"])
    for task, _ in SEQUENCE:
        assert results["tasks"][task]["routing_accuracy"] == 1.0, task
        assert results["tasks"][task]["image_auroc"] >= 0.8, (task, results["tasks"][task])
    assert results["forgetting"] == {"image_auroc": 0.0, "pixel_auroc": 0.0, "pixel_ap": 0.0, "aupro": 0.0}


def test_the_export_records_each_kind_and_runs_torch_free(mixed: dict) -> None:
    manifest = load_manifest(mixed["export_dir"])
    assert {t.name: t.detector for t in manifest.tasks} == {t: k.value for t, k in SEQUENCE}
    assert all(a.file.startswith(f"{DETECTOR_DIR}/") for t in manifest.tasks for a in t.graphs.values())
    runtime = Runtime.load(mixed["export_dir"], RuntimeOptions("onnxruntime-cpu", precision="fp32"))
    assert runtime.router.kinds == {t: k.value for t, k in SEQUENCE}  # explaining compares kinds apart
    for task, _ in SEQUENCE:  # every good image reaches its own product's detector, whatever its kind
        split = load_split(mixed["data"], task, "test", CONFIG.image_size)
        results = runtime.infer(split.images[split.labels == 0])
        assert [r.task for r in results] == [task] * len(results), task
        assert all(r.image_score is not None and r.anomaly_map is not None for r in results), task
    assert UNKNOWN in [r.task for r in runtime.infer(load_split(mixed["data"], UNTRAINED, "test", 128).images)]


def test_memory_graph_matches_torch_and_passes_the_tensorrt_rules(mixed: dict) -> None:
    model, _ = ModelStore(mixed["model_dir"]).load()
    scorer = kind_of(model.kind("cap")).scorer(model, "cap")
    assert isinstance(scorer, MemoryScorer)
    proto = onnx_graphs.scorer_graph(scorer, CONFIG.embed_dim, CONFIG.grid_size)
    ops = {n.op_type for n in proto.graph.node}
    assert {"MatMul", "ReduceMin"} <= ops and not ops & {"CDist", "Loop"}
    assert check_tensorrt_compat(proto).ok, check_tensorrt_compat(proto).problems
    import onnxruntime as ort

    images = load_split(mixed["data"], "cap", "test", CONFIG.image_size).images
    embedded = model.embed(extract_features(model, images).concat)
    patch, image = scorer(embedded)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got_patch, got_image = session.run(None, {"embedding": embedded.numpy()})
    np.testing.assert_allclose(got_patch, patch.numpy(), rtol=1e-5, atol=1e-5 * float(patch.max()))
    np.testing.assert_allclose(got_image, image.numpy(), rtol=1e-5)
    # the image score is the largest patch distance, and distances are the true nearest distances
    bank = model.per_task["cap"].bank
    vectors = (embedded - model.embedder.position).permute(0, 2, 3, 1).reshape(-1, bank.shape[1])
    nearest = torch.cdist(vectors.double(), bank.double()).min(dim=1).values.reshape(patch.shape)
    np.testing.assert_allclose(patch.numpy(), nearest.numpy(), rtol=1e-4, atol=1e-4 * float(nearest.max()))
    assert torch.equal(image, patch.flatten(1).amax(dim=1))


def test_exporting_one_memory_task_leaves_every_other_file_byte_identical(mixed: dict, tmp_path: Path) -> None:
    out = tmp_path / "export"
    export_model(mixed["model_dir"], out, tasks=["weave", "tiles"], precisions=("fp32",))
    before = _files(out)
    export_model(mixed["model_dir"], out, tasks=["cap"], precisions=("fp32",))
    after = _files(out)
    assert all(
        after[name] == content for name, content in before.items() if name != MANIFEST_FILE and "router" not in name
    )
    assert [n for n in after if n.startswith(f"{DETECTOR_DIR}/cap.")], after.keys()


def test_an_int8_export_keeps_a_memory_graph_in_fp32_arithmetic_and_calibrates_nothing_for_it(
    mixed: dict, tmp_path: Path
) -> None:
    out = tmp_path / "export"
    export_model(mixed["model_dir"], out, tasks=["cap"], precisions=("fp32", "int8"), calib_data=mixed["data"])
    manifest = load_manifest(out)
    graphs = manifest.task("cap").graphs
    int8 = onnx.load(str(out / graphs["int8"].file))
    assert not {n.op_type for n in int8.graph.node} & {"QuantizeLinear", "DequantizeLinear"}
    assert int8.graph == onnx.load(str(out / graphs["fp32"].file)).graph
    assert "backbone" in manifest.int8_calibration and f"{DETECTOR_DIR}/cap" not in manifest.int8_calibration


def test_an_export_made_before_detector_kinds_still_loads(mixed: dict, tmp_path: Path) -> None:
    """Before memory tasks, graphs lived under flow/ and task entries had no ``detector``."""
    old = tmp_path / "old-export"
    export_model(mixed["model_dir"], old, tasks=["weave", "tiles"], precisions=("fp32",))
    data = json.loads((old / MANIFEST_FILE).read_text())
    for task in data["tasks"]:
        del task["detector"]
        for graph in task["graphs"].values():
            moved = graph["file"].replace(f"{DETECTOR_DIR}/", "flow/")
            (old / moved).parent.mkdir(exist_ok=True)
            (old / graph["file"]).rename(old / moved)
            graph["file"] = moved
    shutil.rmtree(old / DETECTOR_DIR)
    (old / MANIFEST_FILE).write_text(json.dumps(data))
    manifest = load_manifest(old)
    assert [t.detector for t in manifest.tasks] == ["flow", "flow"]  # the default: what every old task was
    images = load_split(mixed["data"], "tiles", "test", CONFIG.image_size).images
    fresh = Runtime.load(mixed["export_dir"], RuntimeOptions("onnxruntime-cpu", precision="fp32")).infer(images)
    loaded = Runtime.load(old, RuntimeOptions("onnxruntime-cpu", precision="fp32")).infer(images)
    assert [r.task for r in loaded] == [r.task for r in fresh]
    assert [r.image_score for r in loaded if r.task == "tiles"] == [r.image_score for r in fresh if r.task == "tiles"]


def test_a_model_folder_saved_before_detector_kinds_loads_as_flows(mixed: dict, tmp_path: Path) -> None:
    copy = tmp_path / "model"
    shutil.copytree(mixed["model_dir"], copy)
    (copy / TASK_LIST_FILE).write_text(json.dumps({"tasks": ["weave", "tiles", "cap"]}))
    with pytest.raises(Exception, match="weights do not fit"):  # memory banks read as flows do not fit
        ModelStore(copy).load()
    (copy / TASK_LIST_FILE).write_text(json.dumps({"tasks": ["weave"]}))
    assert ModelStore(copy).kinds() == {"weave": DetectorKind.FLOW}


def test_later_tasks_default_to_the_model_folders_detector_kind(mixed: dict, tmp_path: Path) -> None:
    """A model started with detector: memory (configs/memory.json) learns its later tasks as memory
    tasks too, without --config (later tasks always take the model folder's config)."""
    data, model_dir = mixed["data"], tmp_path / "model"
    first = train_task(data, "weave", model_dir, CONFIG.with_overrides(detector="memory"), steps=2, progress=False)
    later = train_task(data, "tiles", model_dir, steps=2, progress=False)
    assert first.detector is later.detector is DetectorKind.MEMORY
    assert ModelStore(model_dir).kinds() == {"weave": DetectorKind.MEMORY, "tiles": DetectorKind.MEMORY}
    asked = train_task(data, "cap", model_dir, steps=2, progress=False, detector="flow")
    assert asked.detector is DetectorKind.FLOW
    with pytest.raises(ValueError, match="knn"):
        train_task(data, UNTRAINED, model_dir, progress=False, detector="knn")


def test_a_crash_while_building_the_bank_leaves_earlier_tasks_intact(
    mixed: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import moleflow_edge.detectors.memory.kind as memory_module

    model_dir = tmp_path / "model"
    shutil.copytree(mixed["model_dir"], model_dir)
    before = _files(model_dir)

    def power_cut(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(memory_module, "greedy_coreset", power_cut)
    with pytest.raises(KeyboardInterrupt):
        train_task(mixed["data"], UNTRAINED, model_dir, progress=False, detector=DetectorKind.MEMORY)
    assert _files(model_dir) == before


def test_a_memory_product_from_two_good_images(mixed: dict, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(mixed["data"] / UNTRAINED, data / UNTRAINED)
    for extra in sorted((data / UNTRAINED / "train" / "good").iterdir())[2:]:
        extra.unlink()
    model_dir = tmp_path / "model"
    shutil.copytree(mixed["model_dir"], model_dir)
    train_task(data, UNTRAINED, model_dir, progress=False, detector=DetectorKind.MEMORY)
    model, prototypes = ModelStore(model_dir).load()
    assert prototypes[UNTRAINED].images == 2
    bank = model.per_task[UNTRAINED].bank
    assert len(bank) == 2 * CONFIG.grid_size**2  # fewer patches than coreset_min: every one is kept
    results = evaluate(data, model_dir, tasks=[UNTRAINED])
    assert results["tasks"][UNTRAINED]["routing_accuracy"] == 1.0
    assert results["tasks"][UNTRAINED]["image_auroc"] >= 0.7


def test_coreset_is_deterministic_for_a_seed_and_covers_better_as_it_grows() -> None:
    vectors = torch.from_numpy(np.random.default_rng(0).normal(size=(3000, 16)).astype(np.float32))
    kept, nearest = greedy_coreset(vectors, 100, seed=3)
    again, _ = greedy_coreset(vectors, 100, seed=3)
    assert torch.equal(kept, again)
    assert not torch.equal(kept, greedy_coreset(vectors, 100, seed=4)[0])
    assert len(set(kept.tolist())) == 100
    exact = torch.cdist(vectors, vectors[kept]).min(dim=1).values
    np.testing.assert_allclose(nearest.numpy(), exact.numpy(), atol=5e-3)  # cdist: expanded form
    radii = [
        float(greedy_coreset(vectors, coreset_size(3000, ratio, 1, 3000), seed=3)[1].max())
        for ratio in (0.01, 0.05, 0.1, 0.3)
    ]
    assert radii == sorted(radii, reverse=True) and radii[0] > radii[-1]
    assert greedy_coreset(vectors, 3000, seed=3)[1].max() == 0


def test_a_coreset_of_many_candidates_is_searched_by_partitions_deterministically() -> None:
    vectors = torch.from_numpy(np.random.default_rng(1).normal(size=(PARTITION_FROM, 8)).astype(np.float32))
    kept, nearest = greedy_coreset(vectors, 400, seed=3)
    assert torch.equal(kept, greedy_coreset(vectors, 400, seed=3)[0]) and len(set(kept.tolist())) == 400
    assert not torch.equal(kept, greedy_coreset(vectors, 400, seed=4)[0])
    true = torch.cdist(vectors.double(), vectors[kept].double()).min(dim=1).values.float()
    assert bool((true <= nearest + 1e-4).all())  # the nearest kept row of its own partition: never nearer
    assert float(nearest.max()) <= 1.2 * float(true.max())  # and close to the true covering radius
    assert float(greedy_coreset(vectors, 800, seed=3)[1].max()) < float(nearest.max())


def test_extending_a_bank_lazily_chooses_what_full_distances_would() -> None:
    rng = np.random.default_rng(2)
    bank = torch.from_numpy(rng.normal(size=(400, 12)).astype(np.float32))
    shifted = bank.repeat(3, 1) * torch.from_numpy(rng.uniform(0.7, 1.3, size=(1200, 1)).astype(np.float32))
    candidates = shifted + 0.3 * torch.from_numpy(rng.normal(size=(1200, 12)).astype(np.float32))
    bound = (candidates - bank.repeat(3, 1)).norm(dim=1)  # each to its own bank row: an upper bound
    nearest, chosen = torch.cdist(candidates.double(), bank.double()).min(dim=1).values, []
    for _ in range(60):  # greedy k-center continued from the bank, every distance computed
        chosen.append(int(nearest.argmax()))
        nearest = torch.minimum(nearest, (candidates.double() - candidates[chosen[-1]].double()).norm(dim=1))
    lazy = extend_coreset(candidates, bank, bound, 60)
    assert lazy.tolist() == chosen
    assert torch.equal(lazy, extend_coreset(candidates, bank, bound, 60))  # deterministic
    assert sorted(extend_coreset(candidates, bank, bound, 5000).tolist()) == list(range(1200))  # all, once each
    copies = bank.repeat(4, 1)  # variants that change nothing: every bound and distance ties at 0
    same = extend_coreset(copies, bank, torch.zeros(len(copies)), 5)
    assert len(same) == 5  # returns: ties among more rows than one check takes never stall the search


def test_coreset_size_keeps_the_ratio_within_its_bounds() -> None:
    assert coreset_size(10_000, 0.1, 500, 4000) == 1000
    assert coreset_size(100_000, 0.1, 500, 4000) == 4000
    assert coreset_size(2_000, 0.1, 500, 4000) == 500
    assert coreset_size(300, 0.1, 500, 4000) == 300
    with pytest.raises(ValueError, match="count must be"):
        greedy_coreset(torch.zeros(5, 2), 6, seed=0)
