"""Continual training: zero forgetting, routed accuracy, and crash safety of the model directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from moleflow_edge.anomaly_map import anomaly_map
from moleflow_edge.config import DetectorKind, MoleFlowConfig
from moleflow_edge.contract import ManifestError
from moleflow_edge.data.mvtec import DatasetError, load_split
from moleflow_edge.data.synth import generate
from moleflow_edge.detectors.registry import score_images
from moleflow_edge.evaluate import evaluate
from moleflow_edge.model_store import SHARED_FILE, ModelDirError, ModelStore
from moleflow_edge.router import UNKNOWN, Prototype, RouterTable, patch_level
from moleflow_edge.torch_backend import model_runtime
from moleflow_edge.train import train_task

SEQUENCE = ["weave", "tiles", "cap"]
# small, but big enough to separate the synthetic defects of an object category (cap) too
TINY_CONFIG = MoleFlowConfig(image_size=160).with_settings(
    DetectorKind.FLOW,
    num_mole_blocks=2,
    num_dia_blocks=1,
    lora_rank=8,
    lora_alpha=8.0,
    max_steps=80,
    batch_size=8,
    lr=1e-3,
)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth160")
    generate(root, SEQUENCE + ["screw"], seed=0, image_size=160, n_train=30, n_test_good=12, n_test_defect=3)
    return root


def _task0_outputs(model_dir: Path, data: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    model, _ = ModelStore(model_dir).load()
    split = load_split(data, SEQUENCE[0], "test", TINY_CONFIG.image_size)
    patch, image = score_images(model, split.images, SEQUENCE[0])
    maps = np.stack([anomaly_map(p, TINY_CONFIG.image_size, TINY_CONFIG.map_sigma) for p in patch.numpy()])
    return patch.numpy(), image.numpy(), maps


@pytest.fixture(scope="module")
def sequence_run(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Train task 0, snapshot everything, then train the later tasks one after another."""
    model_dir = tmp_path_factory.mktemp("model")
    train_task(synth_root, SEQUENCE[0], model_dir, TINY_CONFIG, progress=False)
    store = ModelStore(model_dir)
    after_task0 = {
        "shared_bytes": (model_dir / SHARED_FILE).read_bytes(),
        "task0_bytes": store.task_file(SEQUENCE[0]).read_bytes(),
        "shared_state": store.load()[0].shared_state_dict(),
        "outputs": _task0_outputs(model_dir, synth_root),
    }
    for task in SEQUENCE[1:]:
        train_task(synth_root, task, model_dir, progress=False)
    return {"model_dir": model_dir, "after_task0": after_task0}


def test_shared_weights_unchanged_by_later_tasks(sequence_run: dict) -> None:
    model_dir = sequence_run["model_dir"]
    before = sequence_run["after_task0"]
    assert (model_dir / SHARED_FILE).read_bytes() == before["shared_bytes"]
    assert ModelStore(model_dir).task_file(SEQUENCE[0]).read_bytes() == before["task0_bytes"]
    model, _ = ModelStore(model_dir).load()
    assert model.tasks == SEQUENCE
    after = model.shared_state_dict()
    assert after.keys() == before["shared_state"].keys()
    assert all(torch.equal(after[k], before["shared_state"][k]) for k in after)


def test_task0_scores_and_maps_bit_identical_after_later_tasks(sequence_run: dict, synth_root: Path) -> None:
    patch, image, maps = _task0_outputs(sequence_run["model_dir"], synth_root)
    before_patch, before_image, before_maps = sequence_run["after_task0"]["outputs"]
    assert np.array_equal(patch, before_patch)
    assert np.array_equal(image, before_image)
    assert np.array_equal(maps, before_maps)


def test_routed_accuracy_on_three_synthetic_tasks(sequence_run: dict, synth_root: Path) -> None:
    results = evaluate(synth_root, sequence_run["model_dir"])
    assert results["mode"]["routing"] == "routed"
    runtime = model_runtime(sequence_run["model_dir"])  # what eval scored through
    for task in SEQUENCE:
        metrics = results["tasks"][task]
        assert metrics["routing_accuracy"] == 1.0, task
        assert metrics["unknown_rate"] <= 0.1, task
        split = load_split(synth_root, task, "test", TINY_CONFIG.image_size)
        routed = runtime.infer(split.images)
        rejected = np.array([r.task == UNKNOWN for r in routed])
        assert metrics["unknown_rate"] == pytest.approx(rejected.mean())
        assert not rejected[split.labels == 0].any(), task  # only defective parts look like no product
        assert all(r.image_score is None for r in routed if r.task == UNKNOWN)  # and the line stops them
        # yet their maps come from their own product's flow, the one that explains them best
        assert [r.explained_by for r in routed if r.task == UNKNOWN] == [task] * int(rejected.sum())
        assert metrics["image_auroc"] >= 0.8, (task, metrics)
    assert results["mean"]["image_auroc"] >= 0.9, results["mean"]  # 8 good test images: one task may dip
    assert results["forgetting"] == {"image_auroc": 0.0, "pixel_auroc": 0.0, "pixel_ap": 0.0, "aupro": 0.0}


def test_oracle_scores_every_frame_under_the_named_task(sequence_run: dict, synth_root: Path) -> None:
    """``as_task`` (oracle eval) names the detector; the router's distances are still reported as routed."""
    runtime = model_runtime(sequence_run["model_dir"])
    images = load_split(synth_root, "screw", "test", TINY_CONFIG.image_size).images  # a product never learned
    routed, named = runtime.infer(images), runtime.infer(images, as_task="cap")
    assert [r.task for r in named] == ["cap"] * len(images)
    assert all(r.image_score is not None and r.anomaly_map is not None and r.explained_by is None for r in named)
    assert [r.distances for r in named] == [r.distances for r in routed]
    for r, n in zip(routed, named, strict=True):
        if r.task == "cap":
            assert n.image_score == pytest.approx(r.image_score, rel=1e-5)
    with pytest.raises(ManifestError, match="'screw' is not known"):
        runtime.infer(images, as_task="screw")
    oracle = evaluate(synth_root, sequence_run["model_dir"], oracle=True)
    routed_eval = evaluate(synth_root, sequence_run["model_dir"])
    assert oracle["mode"]["routing"] == "oracle"
    for task in SEQUENCE:  # the router's view is the same; only which detector scores differs
        assert oracle["tasks"][task]["routing_accuracy"] == routed_eval["tasks"][task]["routing_accuracy"]
        assert oracle["tasks"][task]["unknown_rate"] == routed_eval["tasks"][task]["unknown_rate"]


def test_training_is_deterministic_for_a_seed(sequence_run: dict, synth_root: Path, tmp_path: Path) -> None:
    train_task(synth_root, SEQUENCE[0], tmp_path, TINY_CONFIG, progress=False)
    assert (tmp_path / SHARED_FILE).read_bytes() == sequence_run["after_task0"]["shared_bytes"]


def _snapshot(model_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(model_dir)): p.read_bytes() for p in sorted(model_dir.rglob("*")) if p.is_file()}


def test_crash_mid_training_leaves_model_dir_unchanged(
    sequence_run: dict, synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = tmp_path / "model"
    train_task(synth_root, SEQUENCE[0], model_dir, TINY_CONFIG, progress=False)
    before = _snapshot(model_dir)
    calls = {"n": 0}
    import moleflow_edge.detectors.flow.kind as flow_module

    real_loss = flow_module.flow_loss

    def crash_on_third_step(*args: object) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # Ctrl-C or a power cut mid-epoch
        return real_loss(*args)

    monkeypatch.setattr(flow_module, "flow_loss", crash_on_third_step)
    with pytest.raises(KeyboardInterrupt):
        train_task(synth_root, "screw", model_dir, progress=False)
    assert _snapshot(model_dir) == before
    assert ModelStore(model_dir).tasks() == [SEQUENCE[0]]


def test_crash_between_task_file_and_task_list_keeps_earlier_tasks(
    synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = tmp_path / "model"
    train_task(synth_root, SEQUENCE[0], model_dir, TINY_CONFIG, progress=False)
    before_scores = _task0_outputs(model_dir, synth_root)[1]
    import moleflow_edge.model_store as store_module

    def no_list_update(path: Path, text: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(store_module, "write_text_atomic", no_list_update)
    with pytest.raises(OSError):
        train_task(synth_root, "screw", model_dir, progress=False)
    monkeypatch.undo()
    store = ModelStore(model_dir)
    assert store.tasks() == [SEQUENCE[0]]  # the orphan task file is ignored
    assert np.array_equal(_task0_outputs(model_dir, synth_root)[1], before_scores)
    train_task(synth_root, "screw", model_dir, steps=4, progress=False)  # and the task can be trained again
    assert store.tasks() == [SEQUENCE[0], "screw"]


def test_train_refuses_a_task_already_trained(sequence_run: dict, synth_root: Path) -> None:
    with pytest.raises(ModelDirError, match="already trained"):
        train_task(synth_root, SEQUENCE[1], sequence_run["model_dir"], progress=False)


def test_train_names_a_missing_category(synth_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="bolt"):
        train_task(synth_root, "bolt", tmp_path / "model", TINY_CONFIG, progress=False)
    assert not (tmp_path / "model" / "tasks.json").exists()


def test_load_refuses_a_damaged_task_file(sequence_run: dict, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(sequence_run["model_dir"], copy)
    ModelStore(copy).task_file(SEQUENCE[1]).write_bytes(b"not safetensors")
    with pytest.raises(ModelDirError, match=f"{SEQUENCE[1]}.safetensors is damaged"):
        ModelStore(copy).load()


def test_a_frame_beyond_every_limit_is_shown_under_the_flow_that_explains_most_of_it() -> None:
    """Candidates are the nearest tasks by routing distance, nearest first; the explaining task is the
    one whose median patch score lies least far above its own normal level, in units of its spread:
    a defect in one corner does not move the median, and a task with a broad scale gains nothing."""
    levels = {"a": (0.0, 1.0), "b": (0.0, 1.0), "c": (0.0, 1.0), "d": (100.0, 50.0)}
    table = RouterTable(
        list(levels),
        [
            Prototype(np.array([x, 0.0], np.float32), np.eye(2, dtype=np.float32), 1.0, patch_level=level)
            for x, level in zip((0.0, 1.0, 3.0, 6.0), levels.values(), strict=True)
        ],
    )
    distances = table.distances(np.array([[2.2, 0.0], [5.9, 0.0]], np.float32))
    assert table.candidates(distances) == [("c", "b", "a"), ("d", "c", "b")]
    assert table.candidates(distances, known=2) == [("b", "a"), ("b", "a")]
    damaged = np.full((4, 4), 1.0)
    damaged[0, :] = 50.0  # a defect across one row: the max is high, the median is not
    everywhere = np.full((4, 4), 5.0)
    frame = distances[0]
    assert table.explaining_task(("c", "b"), [everywhere, damaged], frame) == "b"
    assert table.explaining_task(("c", "b"), [damaged, everywhere], frame) == "c"
    # d's normal patches score 100 +- 50: 120 is normal for d, 5 is 5 spreads above normal for c
    assert table.explaining_task(("c", "d"), [everywhere, np.full((4, 4), 120.0)], frame) == "d"
    unrecorded = RouterTable(["c", "d"], [Prototype(np.zeros(2, np.float32), np.eye(2, dtype=np.float32), 1.0)] * 2)
    assert unrecorded.explaining_task(("c", "d"), [everywhere, np.full((4, 4), 120.0)], frame[2:]) == "c"  # raw


def test_an_unknown_frame_is_explained_across_kinds_by_routing_distance() -> None:
    """A flow's -log p outgrows a memory bank's distance far from normal, so their patch levels are not
    compared: within a kind the patch levels decide, between kinds the distance in units of each limit."""
    level = (0.0, 1.0)
    table = RouterTable(
        ["flow_a", "memory_b", "flow_c"],
        [
            Prototype(np.array([0.0, 0.0], np.float32), np.eye(2, dtype=np.float32), 4.0, patch_level=level),
            Prototype(np.array([3.0, 0.0], np.float32), np.eye(2, dtype=np.float32), 1.0, patch_level=level),
            Prototype(np.array([1.5, 1.0], np.float32), np.eye(2, dtype=np.float32), 4.0, patch_level=level),
        ],
        ["flow", "memory", "flow"],
    )
    frame = table.distances(np.array([[2.5, 0.0]], np.float32))[0]  # 6.25 / 4 from a, 0.25 / 1 from b
    far, near = np.full((4, 4), 30.0), np.full((4, 4), 2.0)
    # the memory bank finds the frame most normal on its own scale; across kinds that is not comparable,
    # and b is nearer in units of its limit: b explains it
    assert table.explaining_task(("flow_a", "memory_b", "flow_c"), [far, near, far], frame) == "memory_b"
    frame = table.distances(np.array([[1.5, 0.0]], np.float32))[0]  # 2.25 / 4 from a, 2.25 / 1 from b
    assert table.explaining_task(("flow_a", "memory_b", "flow_c"), [far, near, far], frame) == "flow_a"
    # within the flow kind the patch levels still decide, whichever flow is nearer (c: 1.0 / 4)
    assert table.explaining_task(("flow_a", "memory_b", "flow_c"), [near, near, far], frame) == "flow_a"
    assert table.explaining_task(("flow_a", "memory_b", "flow_c"), [far, near, near], frame) == "flow_c"
    with pytest.raises(ValueError, match="2 detector kinds for 3 tasks"):
        RouterTable(table.tasks, [Prototype(np.zeros(2, np.float32), np.eye(2, dtype=np.float32), 1.0)] * 3, ["a", "b"])


def test_the_router_of_the_first_tasks_routes_as_it_did_right_after_them() -> None:
    """``RouterTable.first`` (eval's forgetting: the model right after task t) decides as the full router
    restricted to those tasks, and leaves the full router as it was."""
    table = RouterTable(
        ["a", "b", "c"],
        [Prototype(np.array([x, 0.0], np.float32), np.eye(2, dtype=np.float32), 1.0) for x in (0.0, 2.0, 4.0)],
        ["flow", "memory", "flow"],
    )
    distances = table.distances(np.array([[0.2, 0.0], [3.9, 0.0], [2.9, 0.0], [9.0, 0.0]], np.float32))
    first = table.first(2)
    assert first.tasks == ["a", "b"] and first.kinds == {"a": "flow", "b": "memory"}
    np.testing.assert_array_equal(first.distances(np.array([[3.9, 0.0]], np.float32)), distances[1:2, :2])
    assert first.assign(distances[:, :2]) == table.assign(distances, known=2) == ["a", UNKNOWN, "b", UNKNOWN]
    assert table.assign(distances) == ["a", "c", "b", UNKNOWN]  # the second frame was c's, learned later
    assert first.candidates(distances[:, :2]) == table.candidates(distances, known=2)
    first.limits[:] = np.inf
    assert table.limits.tolist() == [1.0, 1.0, 1.0]


def test_patch_level_is_the_median_and_robust_spread() -> None:
    scores = np.array([1.0, 2.0, 3.0, 4.0, 100.0])
    assert patch_level(scores) == pytest.approx((3.0, 1.4826))
    assert patch_level(np.ones(5))[1] > 0  # never a zero spread to divide by
