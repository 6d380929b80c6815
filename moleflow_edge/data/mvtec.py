"""Loader for datasets in the MVTec AD folder layout.

Layout::

    ROOT/<category>/train/good/*.png
    ROOT/<category>/test/good/*.png
    ROOT/<category>/test/<defect>/*.png
    ROOT/<category>/ground_truth/<defect>/<stem>_mask.png   (none for good)

Torch-free so that calibration and the runtime can read the same files.
Every layout problem raises DatasetError naming the file or folder at fault,
because a line engineer assembling their own dataset needs to know which file
to fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from moleflow_edge.errors import UserError
from moleflow_edge.preprocess import FrameError, read_image_bgr, resize_frame

__all__ = [
    "IMAGE_EXTENSIONS",
    "DatasetError",
    "Sample",
    "Split",
    "list_categories",
    "train_samples",
    "test_samples",
    "load_images",
    "load_masks",
    "load_split",
]

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
GOOD = "good"


class DatasetError(UserError):
    """Bad dataset layout or content; the message names the file or folder and what to do."""


@dataclass(frozen=True)
class Sample:
    """One image of a split, with its ground truth."""

    path: Path
    label: int  # 0 normal, 1 anomalous
    defect: str  # "good" or the defect folder name
    mask_path: Path | None


@dataclass
class Split:
    """A loaded split: images (N,S,S,3) uint8 BGR, labels (N,) int64, masks (N,S,S) bool."""

    images: np.ndarray
    labels: np.ndarray
    masks: np.ndarray
    samples: list[Sample]


def _image_files(folder: Path) -> list[Path]:
    """Sorted image files directly in ``folder``, skipping hidden files."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _subdirs(folder: Path) -> list[Path]:
    """Sorted visible subfolders of ``folder``."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _dataset_root(root: str | Path) -> Path:
    """``root`` as a Path, or a DatasetError if there is no such folder."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist or is not a folder")
    return root


def _category_dir(root: str | Path, category: str) -> Path:
    root = _dataset_root(root)
    folder = root / category
    if not folder.is_dir():
        raise DatasetError(
            f"category folder {folder} does not exist; categories found: {', '.join(_categories_in(root)) or 'none'}"
        )
    return folder


def _categories_in(root: Path) -> list[str]:
    return [p.name for p in _subdirs(root) if (p / "train" / GOOD).is_dir()]


def list_categories(root: str | Path) -> list[str]:
    """Sorted names of the categories under ``root`` that have a train/good folder."""
    root = _dataset_root(root)
    categories = _categories_in(root)
    if not categories:
        raise DatasetError(
            f"no categories found in {root}: expected folders like {root}/<category>/train/good with images"
        )
    return categories


def train_samples(root: str | Path, category: str) -> list[Sample]:
    """The normal training images of ``category``, sorted by file name."""
    good = _category_dir(root, category) / "train" / GOOD
    if not good.is_dir():
        raise DatasetError(f"training folder {good} does not exist; put the normal training images there")
    files = _image_files(good)
    if not files:
        raise DatasetError(
            f"training folder {good} has no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); add normal images"
        )
    return [Sample(path=p, label=0, defect=GOOD, mask_path=None) for p in files]


def test_samples(root: str | Path, category: str) -> list[Sample]:
    """The test images of ``category`` sorted by (defect, name), each defect image with its mask path."""
    category_dir = _category_dir(root, category)
    test_dir = category_dir / "test"
    if not test_dir.is_dir():
        raise DatasetError(f"test folder {test_dir} does not exist; add test/good and test/<defect> folders")
    samples: list[Sample] = []
    for defect_dir in sorted(_subdirs(test_dir), key=lambda p: p.name):
        defect = defect_dir.name
        for path in _image_files(defect_dir):
            if defect == GOOD:
                samples.append(Sample(path=path, label=0, defect=GOOD, mask_path=None))
                continue
            mask_path = category_dir / "ground_truth" / defect / f"{path.stem}_mask.png"
            if not mask_path.is_file():
                raise DatasetError(f"defect image {path} has no mask: expected {mask_path}")
            samples.append(Sample(path=path, label=1, defect=defect, mask_path=mask_path))
    if not samples:
        raise DatasetError(f"test folder {test_dir} has no images in test/good or test/<defect> subfolders")
    return samples


def _read_image(path: Path) -> np.ndarray:
    try:
        return read_image_bgr(path)
    except FrameError as exc:
        raise DatasetError(f"{exc}; fix or remove {path}") from exc


def _read_mask(mask_path: Path, image_path: Path, image_shape: tuple[int, int]) -> np.ndarray:
    """A mask file as bool ``(H, W)``; it must match its image's ``(H, W)``.

    A mask of another size most likely belongs to another image, so it is
    refused rather than silently resized.
    """
    data = np.fromfile(mask_path, dtype=np.uint8) if mask_path.is_file() else np.empty(0, np.uint8)
    mask = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE) if data.size else None
    if mask is None:
        raise DatasetError(f"cannot read mask file {mask_path} for image {image_path}; fix or replace it")
    if mask.shape != image_shape:
        raise DatasetError(
            f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image {image_path} is "
            f"{image_shape[1]}x{image_shape[0]} (WxH); a mask must have the same size as its image"
        )
    return mask > 127


def _load_sample(sample: Sample, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One sample's image ``(size, size, 3)`` uint8 and mask ``(size, size)`` bool, decoding the image once."""
    image = _read_image(sample.path)
    if sample.mask_path is None:
        mask = np.zeros((size, size), dtype=bool)
    else:
        full_mask = _read_mask(sample.mask_path, sample.path, image.shape[:2]).astype(np.uint8)
        mask = cv2.resize(full_mask, (size, size), interpolation=cv2.INTER_NEAREST) > 0
    return resize_frame(image, size), mask


def load_images(samples: Sequence[Sample], size: int) -> np.ndarray:
    """Read and resize the samples' images to uint8 BGR ``(N, size, size, 3)``."""
    images = np.empty((len(samples), size, size, 3), dtype=np.uint8)
    for i, sample in enumerate(samples):
        images[i] = resize_frame(_read_image(sample.path), size)
    return images


def load_masks(samples: Sequence[Sample], size: int) -> np.ndarray:
    """Ground-truth masks as bool ``(N, size, size)``; normal samples are all False.

    Defect images are decoded too, to check that each mask matches its image.
    """
    masks = np.zeros((len(samples), size, size), dtype=bool)
    for i, sample in enumerate(samples):
        if sample.mask_path is not None:
            masks[i] = _load_sample(sample, size)[1]
    return masks


def load_split(root: str | Path, category: str, split: str, size: int) -> Split:
    """Load the "train" or "test" split of ``category`` resized to ``size``."""
    if split == "train":
        samples = train_samples(root, category)
    elif split == "test":
        samples = test_samples(root, category)
    else:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    images = np.empty((len(samples), size, size, 3), dtype=np.uint8)
    masks = np.zeros((len(samples), size, size), dtype=bool)
    for i, sample in enumerate(samples):
        images[i], masks[i] = _load_sample(sample, size)
    labels = np.array([s.label for s in samples], dtype=np.int64)
    return Split(images=images, labels=labels, masks=masks, samples=samples)
