"""A new product with only a handful of good images: refused early or learned, routed and bounded.

Learns a synthetic product from 2, 3 and 4 images after two others and checks routing, the
unknown-product limit, the reports, and that the earlier products are untouched bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import moleflow_edge.train as train_module
from moleflow_edge.atomic import OutputError
from moleflow_edge.calibration import calibrate
from moleflow_edge.cli import app
from moleflow_edge.data.mvtec import DatasetError, load_split
from moleflow_edge.detectors.registry import score_images
from moleflow_edge.errors import UserError
from moleflow_edge.features import extract_features
from moleflow_edge.model_store import ModelDirError, ModelStore
from moleflow_edge.router import FEW_IMAGES, UNKNOWN, RouterTable, fit_prototype, limit_widening
from moleflow_edge.train import train_task
from tests.conftest import TINY_CONFIG

EARLIER = ["weave", "tiles"]
FEW = "cap"  # the product learned from a handful of images
UNTRAINED = "screw"  # a product the model never learns: must come out unknown
MARGIN, QUANTILE = TINY_CONFIG.router_limit_margin, TINY_CONFIG.router_limit_quantile


# --- the prototype rules on plain numbers ----------------------------------------------------------
def test_two_images_give_the_documented_limit() -> None:
    """Two images: each leave-one-out fit is the shrinkage target alone, so the held-out distance is 4C."""
    rng = np.random.default_rng(0)
    for c in (8, 112):
        proto = fit_prototype(rng.normal(size=(2, c)) * rng.uniform(0.5, 3, c), "ledoit_wolf", 1e-5, QUANTILE, MARGIN)
        assert proto.images == 2
        assert proto.limit == pytest.approx(MARGIN * limit_widening(2) * 4 * c, rel=1e-9)
    assert limit_widening(2) == pytest.approx(math.log(11) / math.log(3))
    assert limit_widening(FEW_IMAGES) == limit_widening(200) == 1.0


@pytest.mark.parametrize("n", [2, 3, 4, 6, 9])
def test_new_normal_samples_stay_within_a_few_image_limit(n: int) -> None:
    """Fresh samples of the same product fall inside the limit fitted on n of them."""
    accepted = []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        mean, scales = rng.normal(0, 3, 32), np.exp(rng.normal(0, 0.5, 32))
        proto = fit_prototype(mean + rng.normal(size=(n, 32)) * scales, "ledoit_wolf", 1e-5, QUANTILE, MARGIN)
        table = RouterTable(["a"], [proto])
        fresh = mean + rng.normal(size=(200, 32)) * scales
        accepted.append(np.mean([r == "a" for r in table.assign(table.distances(fresh))]))
    assert np.all(np.isfinite(proto.whitener)) and proto.limit < np.inf
    assert np.mean(accepted) >= 0.99, accepted


def test_prototype_refuses_one_image_and_identical_images() -> None:
    with pytest.raises(UserError, match="at least 2 training images, got 1"):
        fit_prototype(np.ones((1, 8)), "ledoit_wolf", 1e-5, QUANTILE, MARGIN)
    with pytest.raises(UserError, match="identical router features"):
        fit_prototype(np.ones((3, 8)), "ledoit_wolf", 1e-5, QUANTILE, MARGIN)


# --- a model with two products, then a third from a handful of images ------------------------------
def _root_with_few(synth_root: Path, out: Path, n: int) -> Path:
    """A data root like synth_root whose FEW product keeps only its first n training images."""
    out.mkdir()
    for category in [*EARLIER, UNTRAINED]:
        (out / category).symlink_to(synth_root / category, target_is_directory=True)
    shutil.copytree(synth_root / FEW, out / FEW)
    for extra in sorted((out / FEW / "train" / "good").iterdir())[n:]:
        extra.unlink()
    return out


def _snapshot(model_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(model_dir)): p.read_bytes() for p in sorted(model_dir.rglob("*")) if p.is_file()}


def _image_scores(model_dir: Path, data: Path) -> dict[str, np.ndarray]:
    model, _ = ModelStore(model_dir).load()
    scores = {}
    for task in EARLIER:
        images = load_split(data, task, "test", TINY_CONFIG.image_size).images
        scores[task] = score_images(model, images, task)[1].numpy()
    return scores


@pytest.fixture(scope="module")
def base(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """weave then tiles, trained once; their files and scores before any few-image product."""
    model_dir = tmp_path_factory.mktemp("base") / "model"
    for task in EARLIER:
        train_task(synth_root, task, model_dir, TINY_CONFIG, progress=False)
    return {"model_dir": model_dir, "files": _snapshot(model_dir), "scores": _image_scores(model_dir, synth_root)}


@pytest.fixture(scope="module", params=[2, 3, 4], ids=lambda n: f"{n}images")
def learned(
    request: pytest.FixtureRequest, base: dict, synth_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict:
    """The base model plus FEW learned through the command line from n images."""
    n = request.param
    work = tmp_path_factory.mktemp(f"few{n}")
    data = _root_with_few(synth_root, work / "data", n)
    model_dir = work / "model"
    shutil.copytree(base["model_dir"], model_dir)
    result = CliRunner().invoke(app, ["train", "--data", str(data), "--task", FEW, "--model", str(model_dir)])
    assert result.exit_code == 0, result.output
    return {"n": n, "data": data, "model_dir": model_dir, "output": result.output}


def _routes(model_dir: Path, data: Path, category: str, good_only: bool) -> tuple[list[str], list[str]]:
    """(nearest task, routed task or unknown) for the category's test images."""
    model, prototypes = ModelStore(model_dir).load()
    table = RouterTable(model.tasks, [prototypes[t] for t in model.tasks])
    split = load_split(data, category, "test", TINY_CONFIG.image_size)
    images = split.images[split.labels == 0] if good_only else split.images
    distances = table.distances(extract_features(model, images).routing)
    return [table.tasks[i] for i in np.argmin(distances, axis=1)], table.assign(distances)


def test_few_image_product_is_routed_within_its_limit(learned: dict) -> None:
    nearest, _ = _routes(learned["model_dir"], learned["data"], FEW, good_only=False)
    assert nearest == [FEW] * len(nearest)  # good and defective parts alike go to its adapters
    _, routed = _routes(learned["model_dir"], learned["data"], FEW, good_only=True)
    assert routed == [FEW] * len(routed)  # good parts are inside its unknown-product limit


def test_earlier_products_keep_their_images_and_an_unknown_product_stays_unknown(learned: dict) -> None:
    for task in EARLIER:
        _, routed = _routes(learned["model_dir"], learned["data"], task, good_only=True)
        assert routed == [task] * len(routed), task  # the few-image prototype steals nothing
    _, routed = _routes(learned["model_dir"], learned["data"], UNTRAINED, good_only=False)
    assert routed == [UNKNOWN] * len(routed)


def test_prototype_records_its_image_count(learned: dict) -> None:
    _, prototypes = ModelStore(learned["model_dir"]).load()
    assert prototypes[FEW].images == learned["n"]
    assert prototypes[EARLIER[0]].images == len(list((learned["data"] / EARLIER[0] / "train" / "good").iterdir()))


def test_earlier_products_are_untouched_bit_for_bit(learned: dict, base: dict, synth_root: Path) -> None:
    after = _snapshot(learned["model_dir"])
    assert set(after) == set(base["files"]) | {f"tasks/{FEW}.safetensors"}
    changed = [name for name, data in base["files"].items() if after[name] != data]
    assert changed == ["tasks.json"]
    assert json.loads(after["tasks.json"])["tasks"] == [*EARLIER, FEW]
    scores = _image_scores(learned["model_dir"], synth_root)
    for task in EARLIER:
        assert np.array_equal(scores[task], base["scores"][task]), task


def test_train_says_what_few_images_mean(learned: dict) -> None:
    out = " ".join(learned["output"].split())
    n = learned["n"]
    assert f"{FEW} was learned from only {n} good images" in out
    assert f"widened x{limit_widening(n):.2f}" in out
    assert "calibrate" in out


def test_eval_reports_training_images_per_task(learned: dict, tmp_path: Path) -> None:
    report = tmp_path / "eval.json"
    args = ["eval", "--data", str(learned["data"]), "--model", str(learned["model_dir"]), "--json", str(report)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    tasks = json.loads(report.read_text())["tasks"]
    assert tasks[FEW]["train_images"] == learned["n"]
    assert tasks[EARLIER[0]]["train_images"] >= FEW_IMAGES
    assert tasks[FEW]["routing_accuracy"] == 1.0
    out = " ".join(result.output.split())
    assert f"{FEW} was learned from only {learned['n']} good images" in out
    assert f"{EARLIER[0]} was learned" not in out


def test_calibrate_reports_few_training_images_per_task(built: dict, tmp_path: Path) -> None:
    export_dir, data = tmp_path / "export", tmp_path / "data"
    shutil.copytree(built["export_dir"], export_dir)
    shutil.copytree(built["data"], data)  # calibrate counts training images in the data root it is given
    few_task, other = ModelStore(built["model_dir"]).tasks()
    for extra in sorted((data / few_task / "train" / "good").iterdir())[3:]:
        extra.unlink()
    report = calibrate(export_dir, data, 0.1, write=False)
    assert {t.task: t.train_images for t in report.tasks}[few_task] == 3
    result = CliRunner().invoke(
        app, ["calibrate", "--export", str(export_dir), "--data", str(data), "--target-fpr", "0.1"]
    )
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert f"{few_task} was learned from only 3 good images" in out
    assert f"{other} was learned" not in out


# --- refusals come before any model or training work -----------------------------------------------
@pytest.fixture
def no_model_work(monkeypatch: pytest.MonkeyPatch) -> None:
    def started(*args: object, **kwargs: object) -> None:
        raise AssertionError("a refusal came after model work had started")

    monkeypatch.setattr(train_module, "prepare_model", started)


def test_one_good_image_is_refused_before_any_work(synth_root: Path, tmp_path: Path, no_model_work: None) -> None:
    data = _root_with_few(synth_root, tmp_path / "data", 1)
    with pytest.raises(DatasetError, match=r"cap.*1 distinct good image;.*at least 2"):
        train_task(data, FEW, tmp_path / "model", TINY_CONFIG, progress=False)


def test_identical_copies_do_not_count_as_images(synth_root: Path, tmp_path: Path, no_model_work: None) -> None:
    data = _root_with_few(synth_root, tmp_path / "data", 1)
    good = data / FEW / "train" / "good"
    first = next(good.iterdir())
    shutil.copy(first, good / f"copy{first.suffix}")
    with pytest.raises(DatasetError, match=rf"identical copies: copy{first.suffix} = {first.name}"):
        train_task(data, FEW, tmp_path / "model", TINY_CONFIG, progress=False)


def test_bad_name_taken_name_and_unusable_model_folder_are_refused_before_any_work(
    base: dict, synth_root: Path, tmp_path: Path, no_model_work: None
) -> None:
    with pytest.raises(ValueError, match="task name 'cap/x'"):
        train_task(synth_root, "cap/x", tmp_path / "model", TINY_CONFIG, progress=False)
    with pytest.raises(ModelDirError, match="already trained"):
        train_task(synth_root, EARLIER[0], base["model_dir"], progress=False)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError, match="a_file is a file"):
        train_task(synth_root, FEW, blocker / "model", TINY_CONFIG, progress=False)
    with pytest.raises(OutputError, match="a_file: exists and is not a folder"):
        train_task(synth_root, FEW, blocker, TINY_CONFIG, progress=False)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes to read-only folders")
def test_read_only_model_folder_is_refused_before_any_work(
    synth_root: Path, tmp_path: Path, no_model_work: None
) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    model_dir.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="cannot write in"):
            train_task(synth_root, FEW, model_dir, TINY_CONFIG, progress=False)
    finally:
        model_dir.chmod(0o700)
