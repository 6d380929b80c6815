"""Tests for the MVTec-layout loader and the shared frame preprocessing."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from moleflow_edge.data import mvtec, synth
from moleflow_edge.preprocess import FrameError, check_frame, read_image_bgr, resize_frame


def _write(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, data = cv2.imencode(path.suffix, image)
    assert ok
    data.tofile(path)
    return path


def _image(h: int = 20, w: int = 24, value: int = 100) -> np.ndarray:
    return np.full((h, w, 3), value, np.uint8)


def _mask(h: int = 20, w: int = 24) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    mask[5:10, 5:12] = 255
    return mask


@pytest.fixture
def category(tmp_path: Path) -> Path:
    """A minimal valid category: two train images, one good and one defect test image with its mask."""
    cat = tmp_path / "widget"
    _write(cat / "train" / "good" / "000.png", _image())
    _write(cat / "train" / "good" / "001.png", _image(value=110))
    _write(cat / "test" / "good" / "000.png", _image())
    _write(cat / "test" / "crack" / "000.png", _image(value=30))
    _write(cat / "ground_truth" / "crack" / "000_mask.png", _mask())
    return cat


# --- bad dataset layouts -------------------------------------------------------------------------


def test_missing_root(tmp_path: Path) -> None:
    root = tmp_path / "no_such_root"
    with pytest.raises(mvtec.DatasetError, match="no_such_root"):
        mvtec.list_categories(root)
    with pytest.raises(mvtec.DatasetError, match="no_such_root"):
        mvtec.train_samples(root, "widget")


def test_root_without_categories(tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    with pytest.raises(mvtec.DatasetError) as info:
        mvtec.list_categories(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_missing_category(category: Path) -> None:
    with pytest.raises(mvtec.DatasetError) as info:
        mvtec.train_samples(category.parent, "gadget")
    assert str(category.parent / "gadget") in str(info.value)
    assert "widget" in str(info.value)  # lists what exists


def test_missing_train_good(tmp_path: Path) -> None:
    (tmp_path / "widget" / "test" / "good").mkdir(parents=True)
    with pytest.raises(mvtec.DatasetError) as info:
        mvtec.train_samples(tmp_path, "widget")
    assert str(tmp_path / "widget" / "train" / "good") in str(info.value)


def test_empty_train_good(tmp_path: Path) -> None:
    good = tmp_path / "widget" / "train" / "good"
    good.mkdir(parents=True)
    (good / "readme.txt").write_text("not an image")
    _write(good / ".hidden.png", _image())
    with pytest.raises(mvtec.DatasetError, match="no images") as info:
        mvtec.train_samples(tmp_path, "widget")
    assert str(good) in str(info.value)


def test_missing_test_folder(category: Path) -> None:
    for path in sorted((category / "test").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (category / "test").rmdir()
    with pytest.raises(mvtec.DatasetError) as info:
        mvtec.test_samples(category.parent, "widget")
    assert str(category / "test") in str(info.value)


def test_empty_test_folder(tmp_path: Path) -> None:
    _write(tmp_path / "widget" / "train" / "good" / "000.png", _image())
    (tmp_path / "widget" / "test" / "good").mkdir(parents=True)
    with pytest.raises(mvtec.DatasetError) as info:
        mvtec.test_samples(tmp_path, "widget")
    assert str(tmp_path / "widget" / "test") in str(info.value)


def test_defect_image_without_mask(category: Path) -> None:
    _write(category / "test" / "crack" / "001.png", _image())
    with pytest.raises(mvtec.DatasetError) as info:
        mvtec.test_samples(category.parent, "widget")
    message = str(info.value)
    assert str(category / "test" / "crack" / "001.png") in message
    assert str(category / "ground_truth" / "crack" / "001_mask.png") in message


def test_mask_size_differs_from_image(category: Path) -> None:
    mask_path = _write(category / "ground_truth" / "crack" / "000_mask.png", _mask(h=10, w=12))
    with pytest.raises(mvtec.DatasetError) as info:
        mvtec.load_split(category.parent, "widget", "test", 16)
    message = str(info.value)
    assert str(mask_path) in message
    assert str(category / "test" / "crack" / "000.png") in message
    assert "12x10" in message and "24x20" in message


def test_corrupt_image_file(category: Path) -> None:
    bad = category / "train" / "good" / "002.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    with pytest.raises(mvtec.DatasetError) as info:
        mvtec.load_split(category.parent, "widget", "train", 16)
    assert str(bad) in str(info.value)
    with pytest.raises(FrameError, match="002.png"):
        read_image_bgr(bad)


def test_missing_image_file(tmp_path: Path) -> None:
    with pytest.raises(FrameError, match="nothing.png"):
        read_image_bgr(tmp_path / "nothing.png")


def test_bad_split_name(category: Path) -> None:
    with pytest.raises(ValueError, match="validation"):
        mvtec.load_split(category.parent, "widget", "validation", 16)


# --- reading images ------------------------------------------------------------------------------


def test_grayscale_and_rgba_load_as_three_channels(tmp_path: Path) -> None:
    gray = np.arange(20 * 24, dtype=np.uint8).reshape(20, 24)
    rgba = np.dstack([_image(value=50), np.full((20, 24), 7, np.uint8)])
    rgba[..., 2] = 200
    gray_bgr = read_image_bgr(_write(tmp_path / "gray.png", gray))
    rgba_bgr = read_image_bgr(_write(tmp_path / "rgba.png", rgba))
    assert gray_bgr.shape == rgba_bgr.shape == (20, 24, 3)
    assert gray_bgr.dtype == rgba_bgr.dtype == np.uint8
    np.testing.assert_array_equal(gray_bgr[..., 1], gray)
    np.testing.assert_array_equal(rgba_bgr, rgba[..., :3])


def test_sixteen_bit_image_loads_as_uint8(tmp_path: Path) -> None:
    deep = np.full((8, 8), 256 * 200, np.uint16)
    image = read_image_bgr(_write(tmp_path / "deep.png", deep))
    assert image.dtype == np.uint8 and image.shape == (8, 8, 3)
    assert int(image[0, 0, 0]) == 200


def test_unicode_path_and_upper_case_extension(tmp_path: Path) -> None:
    good = tmp_path / "prüfteil" / "train" / "good"
    _write(good / "Bild_ä.PNG", _image())
    samples = mvtec.train_samples(tmp_path, "prüfteil")
    assert [s.path.name for s in samples] == ["Bild_ä.PNG"]
    assert mvtec.load_images(samples, 8).shape == (1, 8, 8, 3)


def test_list_categories_needs_train_good(category: Path) -> None:
    (category.parent / "empty_cat" / "test").mkdir(parents=True)
    _write(category.parent / "another" / "train" / "good" / "000.png", _image())
    assert mvtec.list_categories(category.parent) == ["another", "widget"]


def test_test_samples_sorted_with_masks(category: Path) -> None:
    _write(category / "test" / "bent" / "000.png", _image())
    _write(category / "ground_truth" / "bent" / "000_mask.png", _mask())
    samples = mvtec.test_samples(category.parent, "widget")
    assert [(s.defect, s.label) for s in samples] == [("bent", 1), ("crack", 1), ("good", 0)]
    assert samples[2].mask_path is None
    assert samples[0].mask_path == category / "ground_truth" / "bent" / "000_mask.png"


def test_load_split_on_synthetic_dataset(tmp_path: Path) -> None:
    synth.generate(tmp_path, ["tiles"], image_size=64, n_train=3, n_test_good=2, n_test_defect=1)
    train = mvtec.load_split(tmp_path, "tiles", "train", 32)
    assert train.images.shape == (3, 32, 32, 3) and train.images.dtype == np.uint8
    assert train.masks.shape == (3, 32, 32) and train.masks.dtype == bool
    assert not train.masks.any() and train.labels.tolist() == [0, 0, 0]

    test = mvtec.load_split(tmp_path, "tiles", "test", 32)
    n = 2 + len(synth.DEFECT_KINDS)
    assert test.images.shape == (n, 32, 32, 3) and test.masks.shape == (n, 32, 32)
    assert len(test.samples) == n
    for sample, label, mask in zip(test.samples, test.labels, test.masks, strict=True):
        assert label == sample.label == (sample.defect != "good")
        assert mask.any() == bool(label)
    np.testing.assert_array_equal(test.masks, mvtec.load_masks(test.samples, 32))
    np.testing.assert_array_equal(test.images, mvtec.load_images(test.samples, 32))


# --- frame checks and resizing -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "words"),
    [
        (np.zeros((0, 10, 3), np.uint8), "empty"),
        (np.zeros((10, 10, 3), np.float32), "float32"),
        (np.zeros((10, 10, 4), np.uint8), "4 channels"),
        (np.zeros((10, 10), np.uint8), "2 dimensions"),
        ([[0, 0, 0]], "list"),
        (None, "NoneType"),
    ],
    ids=["empty", "dtype", "channels", "grayscale", "list", "none"],
)
def test_check_frame_rejects(frame: object, words: str) -> None:
    with pytest.raises(FrameError) as info:
        check_frame(frame)
    assert words in str(info.value)
    assert "uint8 BGR HxWx3" in str(info.value)


def test_check_frame_accepts_bgr() -> None:
    frame = _image()
    assert check_frame(frame) is frame


def test_resize_frame_shrink_uses_area_and_grow_uses_linear() -> None:
    rng = np.random.default_rng(0)
    big = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    small = rng.integers(0, 256, (10, 40, 3), dtype=np.uint8)
    shrunk = resize_frame(big, 32)
    np.testing.assert_array_equal(shrunk, cv2.resize(big, (32, 32), interpolation=cv2.INTER_AREA))
    np.testing.assert_array_equal(resize_frame(small, 32), cv2.resize(small, (32, 32), interpolation=cv2.INTER_LINEAR))
    assert shrunk.flags.c_contiguous and shrunk.dtype == np.uint8
    view = big[:, ::2]  # non-contiguous input
    assert resize_frame(view, 40).flags.c_contiguous


def test_resize_frame_checks_frame() -> None:
    with pytest.raises(FrameError):
        resize_frame(np.zeros((10, 10), np.uint8), 8)
