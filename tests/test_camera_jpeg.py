"""MJPEG cameras: a known product's JPEG-compressed good frames are routed to it, never stopped as unknown."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from moleflow_edge.augment import CAMERA_JPEG_QUALITIES, jpeg_round_trips
from moleflow_edge.config import DetectorKind
from moleflow_edge.data.mvtec import load_split
from moleflow_edge.features import extract_features
from moleflow_edge.metrics import auroc
from moleflow_edge.model.continual_model import ContinualModel
from moleflow_edge.model_store import ModelStore
from moleflow_edge.router import UNKNOWN, RouterTable, fit_prototype
from moleflow_edge.torch_backend import model_runtime
from moleflow_edge.train import prepare_model, train_task, training_features
from tests.conftest import TINY_CONFIG

LEARNED = "screw"  # its good frames at JPEG 75 were all stopped when prototypes saw PNG only
UNLEARNED = "weave"
MARGIN, QUANTILE = TINY_CONFIG.router_limit_margin, TINY_CONFIG.router_limit_quantile


def test_jpeg_round_trips_lose_more_at_lower_quality(synth_root: Path) -> None:
    images = load_split(synth_root, LEARNED, "train", 64).images[:3]
    trips = jpeg_round_trips(images, (95, 75, 40))
    assert trips.shape == (3, *images.shape) and trips.dtype == np.uint8
    errors = [np.abs(t.astype(np.float32) - images).mean() for t in trips]
    assert 0 < errors[0] < errors[1] < errors[2]
    assert jpeg_round_trips(images).shape[0] == len(CAMERA_JPEG_QUALITIES)


def test_variants_widen_only_the_direction_they_move_along() -> None:
    """Round trips that move every image along one thin direction let a frame moved that way in,
    and leave a frame moved as far along another thin direction out."""
    rng = np.random.default_rng(0)
    n, c = 40, 16
    scales = np.r_[np.full(c - 2, 1.0), 0.05, 0.05]  # two thin directions, the last two channels
    feats = rng.normal(size=(n, c)) * scales
    moved = np.zeros(c)
    moved[-2] = 12.0  # compression's direction: 240 of the thin direction's spreads
    variants = np.stack([feats + moved * s for s in (0.5, 1.0)])
    other = np.roll(moved, 1)  # as far along the other thin direction
    probes = np.stack([moved, other])
    for variant_input, expected in ((None, [UNKNOWN, UNKNOWN]), (variants, ["a", UNKNOWN])):
        proto = fit_prototype(feats, "ledoit_wolf", 1e-5, QUANTILE, MARGIN, variants=variant_input)
        assert proto.images == n  # images, not rows
        table = RouterTable(["a"], [proto])
        assert table.assign(table.distances(probes)) == expected


def test_no_variants_and_zero_variants_fit_the_same_prototype() -> None:
    feats = np.random.default_rng(1).normal(size=(12, 8))
    plain = fit_prototype(feats, "ledoit_wolf", 1e-5, QUANTILE, MARGIN)
    empty = fit_prototype(feats, "ledoit_wolf", 1e-5, QUANTILE, MARGIN, variants=np.zeros((0, 12, 8)))
    assert plain.limit == empty.limit and np.array_equal(plain.whitener, empty.whitener)


@pytest.fixture(scope="module")
def learned(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[ContinualModel, RouterTable]:
    """LEARNED alone, with the pretrained backbone (a random one barely moves under JPEG)."""
    model_dir = tmp_path_factory.mktemp("jpeg") / "model"
    train_task(synth_root, LEARNED, model_dir, TINY_CONFIG, steps=2, progress=False)
    model, prototypes = ModelStore(model_dir).load()
    return model, RouterTable(model.tasks, [prototypes[t] for t in model.tasks])


@pytest.mark.parametrize("quality", [95, 90, 75])
def test_jpeg_good_frames_of_a_learned_product_are_routed_to_it(
    learned: tuple[ContinualModel, RouterTable], synth_root: Path, quality: int
) -> None:
    model, table = learned
    split = load_split(synth_root, LEARNED, "test", TINY_CONFIG.image_size)
    good = jpeg_round_trips(split.images[split.labels == 0], (quality,))[0]
    assert table.assign(table.distances(extract_features(model, good).routing)) == [LEARNED] * len(good)


def test_jpeg_frames_of_an_unlearned_product_stay_unknown(
    learned: tuple[ContinualModel, RouterTable], synth_root: Path
) -> None:
    model, table = learned
    images = load_split(synth_root, UNLEARNED, "test", TINY_CONFIG.image_size).images
    for frames in (images, jpeg_round_trips(images, (75,))[0]):
        assert table.assign(table.distances(extract_features(model, frames).routing)) == [UNKNOWN] * len(images)


@pytest.mark.parametrize("learn", [True, False])
def test_detectors_learn_jpeg_round_trips_unless_switched_off(synth_root: Path, tmp_path: Path, learn: bool) -> None:
    model = prepare_model(ModelStore(tmp_path / "empty"), TINY_CONFIG.with_overrides(augment_jpeg=learn)).eval()
    images = load_split(synth_root, LEARNED, "train", TINY_CONFIG.image_size).images[:2]
    concat, routing = training_features(model, images)
    trips = len(CAMERA_JPEG_QUALITIES)
    assert routing.shape[0] == 1 + trips  # the router learns them whatever the switch
    assert concat.shape[0] == 1 + trips * learn + TINY_CONFIG.augment_copies
    coarsest = extract_features(model, jpeg_round_trips(images, CAMERA_JPEG_QUALITIES[-1:])[0])
    assert np.array_equal(routing[trips], coarsest.routing)
    if learn:  # the round trips follow the originals, in quality order
        assert torch.equal(concat[trips], coarsest.concat)


def test_a_memory_bank_with_jpeg_round_trips_shifts_jpeg_good_frames_less(synth_root: Path, tmp_path: Path) -> None:
    """The score shift (AUROC of JPEG 75 good frames' image scores against the same frames as PNG,
    0.5 = none) is smaller for a bank that holds compressed normal patches."""
    split = load_split(synth_root, LEARNED, "test", TINY_CONFIG.image_size)
    good = split.images[split.labels == 0]
    shifts = {}
    for learn in (False, True):
        model_dir = tmp_path / f"jpeg-{learn}"
        config = TINY_CONFIG.with_overrides(augment_jpeg=learn)
        train_task(synth_root, LEARNED, model_dir, config, steps=2, progress=False, detector=DetectorKind.MEMORY)
        runtime = model_runtime(model_dir)
        frames = (good, jpeg_round_trips(good, (75,))[0])
        png, jpeg = (
            np.array([np.inf if r.image_score is None else r.image_score for r in runtime.infer(f, with_maps=False)])
            for f in frames
        )  # a frame the router stops scores +inf: shifted as far as it goes
        shifts[learn] = auroc(np.r_[np.zeros(len(png)), np.ones(len(jpeg))], np.r_[png, jpeg])
    assert shifts[True] < shifts[False]
