"""Tests for the synthetic MVTec-layout generator."""

from __future__ import annotations

import itertools
from pathlib import Path

import cv2
import numpy as np
import pytest

from moleflow_edge.atomic import OutputError
from moleflow_edge.data import mvtec, synth

SIZE = 64
COUNTS = {"n_train": 4, "n_test_good": 2, "n_test_defect": 2}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    assert synth.generate(root, seed=3, image_size=SIZE, **COUNTS) == list(synth.CATEGORIES)
    return root


def test_same_seed_gives_identical_bytes(dataset: Path, tmp_path: Path) -> None:
    synth.generate(tmp_path, seed=3, image_size=SIZE, **COUNTS)
    first, second = _files(dataset), _files(tmp_path)
    assert first.keys() == second.keys()
    assert first == second


def test_different_seed_differs(dataset: Path, tmp_path: Path) -> None:
    synth.generate(tmp_path, seed=4, image_size=SIZE, **COUNTS)
    first, second = _files(dataset), _files(tmp_path)
    assert first.keys() == second.keys()
    pngs = [k for k in first if k.endswith(".png")]
    assert all(first[k] != second[k] for k in pngs)


def test_category_does_not_depend_on_the_others(dataset: Path, tmp_path: Path) -> None:
    synth.generate(tmp_path, ["cap"], seed=3, image_size=SIZE, **COUNTS)
    assert _files(tmp_path / "cap") == _files(dataset / "cap")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cap"]


def test_layout_loads_with_mvtec_loader(dataset: Path) -> None:
    assert mvtec.list_categories(dataset) == sorted(synth.CATEGORIES)
    for category in synth.CATEGORIES:
        train = mvtec.load_split(dataset, category, "train", 32)
        test = mvtec.load_split(dataset, category, "test", 32)
        assert len(train.samples) == COUNTS["n_train"]
        assert test.labels.tolist().count(0) == COUNTS["n_test_good"]
        defects = {s.defect for s in test.samples if s.label == 1}
        assert defects == set(synth.DEFECT_KINDS)
        assert test.labels.sum() == COUNTS["n_test_defect"] * len(synth.DEFECT_KINDS)


def test_masks_are_binary_nonzero_and_image_sized(dataset: Path) -> None:
    masks = sorted(dataset.glob("*/ground_truth/*/*_mask.png"))
    assert len(masks) == len(synth.CATEGORIES) * len(synth.DEFECT_KINDS) * COUNTS["n_test_defect"]
    for mask_path in masks:
        mask = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED)
        image_path = mask_path.parents[2] / "test" / mask_path.parent.name / mask_path.name.replace("_mask", "")
        image = cv2.imread(str(image_path), cv2.IMREAD_UNCHANGED)
        assert mask.ndim == 2 and mask.shape == image.shape[:2] == (SIZE, SIZE)
        assert set(np.unique(mask).tolist()) == {0, 255}
        assert (mask > 0).mean() >= synth.MIN_DEFECT_AREA


def test_normal_images_vary(dataset: Path) -> None:
    for category in synth.CATEGORIES:
        images = mvtec.load_split(dataset, category, "train", SIZE).images.astype(np.float32)
        for a, b in itertools.combinations(images, 2):
            assert np.abs(a - b).mean() > 3.0, category


def test_categories_look_different(dataset: Path) -> None:
    means = {
        c: mvtec.load_split(dataset, c, "train", SIZE).images.astype(np.float32).mean(axis=0) for c in synth.CATEGORIES
    }
    for a, b in itertools.combinations(synth.CATEGORIES, 2):
        assert np.abs(means[a] - means[b]).mean() > 20.0, (a, b)


def test_unknown_category_lists_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as info:
        synth.generate(tmp_path, ["weave", "bottle"])
    assert "bottle" in str(info.value)
    assert all(c in str(info.value) for c in synth.CATEGORIES)


def test_refuses_to_overwrite_a_foreign_folder(tmp_path: Path) -> None:
    real = tmp_path / "screw" / "train" / "good"
    real.mkdir(parents=True)
    (real / "keep.png").write_bytes(b"real data")
    with pytest.raises(OutputError, match="screw"):
        synth.generate(tmp_path, ["screw"], image_size=SIZE, **COUNTS)
    assert (real / "keep.png").read_bytes() == b"real data"


def test_regenerates_over_its_own_output(tmp_path: Path) -> None:
    synth.generate(tmp_path, ["tiles"], image_size=SIZE, n_train=5, n_test_good=1, n_test_defect=1)
    synth.generate(tmp_path, ["tiles"], image_size=SIZE, n_train=2, n_test_good=1, n_test_defect=1)
    assert len(mvtec.train_samples(tmp_path, "tiles")) == 2
