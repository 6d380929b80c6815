"""Config options the real-products work added: grid, gain normalisation, patch score, variants, stopping."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIG

from moleflow_edge.augment import photometric_variants
from moleflow_edge.backbones import build_backbone
from moleflow_edge.config import DetectorKind, MoleFlowConfig
from moleflow_edge.detectors.flow.merged import merge_task
from moleflow_edge.detectors.flow.parts import flow, nll_from_latent, patch_scores
from moleflow_edge.detectors.registry import build_model, kind_of, score_images
from moleflow_edge.features import patch_spacing
from moleflow_edge.migrations.model_dir import nest_flat_fields
from moleflow_edge.model.continual_model import ContinualModel
from moleflow_edge.model.embedding import FeatureEmbedder
from moleflow_edge.model_store import CONFIG_FILE, ModelStore
from moleflow_edge.train import holdout_split, train_task


def _model(patch_stride: int = 16, **flow_settings: object) -> ContinualModel:
    cfg = TINY_CONFIG.with_overrides(image_size=64, patch_stride=patch_stride).with_settings("flow", **flow_settings)
    backbone = build_backbone(cfg, random_init=True)
    torch.manual_seed(0)
    model = build_model(cfg, backbone)
    model.add_task("a", kind_of(DetectorKind.FLOW))
    with torch.no_grad():  # non-zero adapters, so that the flow is not the identity
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _images(seed: int = 0, high: int = 200) -> np.ndarray:
    return np.random.default_rng(seed).integers(20, high, (2, 64, 64, 3), dtype=np.uint8)


@pytest.mark.parametrize("stride,grid", [(16, 4), (8, 8)])
def test_patch_grid_follows_the_stride(stride: int, grid: int) -> None:
    model = _model(patch_stride=stride)
    patch, image = score_images(model, _images(), "a")
    assert model.config.grid_size == grid
    assert patch.shape == (2, grid, grid) and image.shape == (2,)


def test_gain_normalisation_makes_a_global_exposure_change_nearly_invisible() -> None:
    frames = _images(high=200)  # no pixel clips at x1.1
    darker = np.rint(frames * 0.9).astype(np.uint8)
    brighter = np.rint(frames * 1.1).astype(np.uint8)
    for gain_normalise, expect_close in ((True, True), (False, False)):
        backbone = build_backbone(MoleFlowConfig(image_size=64, gain_normalise=gain_normalise), random_init=True)
        x = backbone.normalise(torch.from_numpy(frames))
        for changed in (darker, brighter):
            diff = (backbone.normalise(torch.from_numpy(changed)) - x).abs().max().item()
            assert (diff < 0.05) is expect_close, (gain_normalise, diff)  # 0.05: uint8 rounding of a 0.45 std


@pytest.mark.parametrize("spatial_context", [True, False])
@pytest.mark.parametrize("whitening", ["layernorm", "mahalanobis"])
@pytest.mark.parametrize("score", ["latent", "nll"])
def test_merged_flow_scores_like_the_model_for_both_patch_scores(
    score: str, whitening: str, spatial_context: bool
) -> None:
    model = _model(anomaly_score=score, whitening=whitening, spatial_context=spatial_context)
    if whitening == "mahalanobis":
        model.per_task["a"].whitening.fit(
            model.embed(model.patch_concat(model.backbone_maps(torch.from_numpy(_images(1)))))
        )
    embedded = model.embed(model.patch_concat(model.backbone_maps(torch.from_numpy(_images()))))
    z, log_det = flow(model, embedded, "a")
    expected = 0.5 * z.pow(2).sum(dim=1) if score == "latent" else nll_from_latent(z, log_det)
    merged_patch, _ = merge_task(model, "a")(embedded)
    assert torch.allclose(patch_scores(model, embedded, "a"), expected)
    assert torch.allclose(merged_patch, expected, rtol=1e-4, atol=1e-3)
    assert not torch.allclose(0.5 * z.pow(2).sum(dim=1), nll_from_latent(z, log_det), atol=1e-2)


def test_photometric_variants_are_seeded_bounded_and_different() -> None:
    images = _images()
    a = photometric_variants(images, 3, 0.2, seed=1)
    assert a.shape == (3, *images.shape) and a.dtype == np.uint8
    assert np.array_equal(a, photometric_variants(images, 3, 0.2, seed=1))
    assert not np.array_equal(a, photometric_variants(images, 3, 0.2, seed=2))
    ratio = a.astype(float).mean(axis=(2, 3, 4)) / images.astype(float).mean(axis=(1, 2, 3))
    assert np.all((ratio > 0.6) & (ratio < 1.5)) and not np.allclose(ratio, 1.0, atol=0.01)
    assert np.array_equal(photometric_variants(images, 2, 0.0, seed=0)[0], images)  # strength 0: unchanged


@pytest.mark.parametrize("count,fraction,held", [(2, 0.2, 0), (3, 0.2, 1), (10, 0.2, 2), (60, 0.2, 12), (60, 0.0, 0)])
def test_holdout_split_sizes(count: int, fraction: float, held: int) -> None:
    fit, out = holdout_split(count, fraction, seed=0)
    assert len(out) == held and len(fit) == count - held
    assert sorted([*fit, *out]) == list(range(count))


def test_training_stops_on_held_out_loss_and_keeps_the_best_step(synth_root: Path, tmp_path: Path) -> None:
    config = TINY_CONFIG.with_settings("flow", lr=3e-2, eval_every=2, patience=2)
    report = train_task(synth_root, "weave", tmp_path / "m", config, steps=200, progress=False, random_backbone=True)
    assert report.holdout_images == 6
    steps, best_step = report.metrics["steps"], report.metrics["best_step"]
    assert steps < 200  # a learning rate this high stops improving the held-out loss early
    assert best_step <= steps - 2 * 2
    assert best_step % 2 == 0


def test_patch_spacing_is_the_median_distance_to_another_images_nearest_patch() -> None:
    # 5 images of 2x2 patches in 3 channels; image i's patches sit at i * (1, 0, 0) + tiny offsets,
    # so a patch's nearest patch of another image is one image away: distance 1
    base = torch.arange(5, dtype=torch.float32)[:, None, None, None] * torch.tensor([1.0, 0, 0])[None, :, None, None]
    offsets = torch.tensor([0.0, 0.001, 0.002, 0.003]).view(1, 1, 2, 2) * torch.tensor([0, 1.0, 0]).view(1, 3, 1, 1)
    assert patch_spacing(base + offsets) == pytest.approx(1.0, abs=0.01)
    # it is a length: it scales with the features
    assert patch_spacing(3 * (base + offsets)) == pytest.approx(3.0, abs=0.03)


def test_feature_noise_is_added_before_whitening_in_feature_units() -> None:
    model = _model(whitening="mahalanobis")
    embedded = model.embed(model.patch_concat(model.backbone_maps(torch.from_numpy(_images(1)))))
    model.per_task["a"].whitening.fit(embedded)
    torch.manual_seed(3)
    noisy, _ = flow(model, embedded, "a", noise=2.0)
    torch.manual_seed(3)
    expected, _ = flow(model, embedded + 2.0 * torch.randn_like(embedded), "a")
    assert torch.allclose(noisy, expected)
    assert not torch.allclose(noisy, flow(model, embedded, "a")[0])


def _flat_form(config: MoleFlowConfig) -> dict[str, object]:
    """``config`` as config.json was written before sections: every kind's fields at the top level."""
    data = config.to_dict()
    sections = [data.pop(kind.value) for kind in DetectorKind]
    return {**data, **{k: v for section in sections for k, v in section.items()}}  # type: ignore[union-attr]


def test_a_model_saved_before_spatial_context_existed_is_rebuilt_with_it(tmp_path: Path) -> None:
    saved = _flat_form(MoleFlowConfig())
    del saved["spatial_context"]
    (tmp_path / CONFIG_FILE).write_text(json.dumps(saved))
    assert ModelStore(tmp_path).config().section("flow").spatial_context is True  # how such a model was built
    default = MoleFlowConfig().section("flow").spatial_context
    assert (
        MoleFlowConfig.from_json(tmp_path / CONFIG_FILE, upgrade=nest_flat_fields).section("flow").spatial_context
        is default
    )


def test_a_config_in_the_flat_form_reads_into_each_kinds_section(tmp_path: Path) -> None:
    config = TINY_CONFIG.with_settings("memory", coreset_min=7, memory_probe=3).with_settings(
        "flow", spatial_context=True
    )
    (tmp_path / "flat.json").write_text(json.dumps(_flat_form(config)))
    (tmp_path / "sectioned.json").write_text(json.dumps(config.to_dict()))
    assert MoleFlowConfig.from_json(tmp_path / "flat.json", upgrade=nest_flat_fields) == config  # --config
    assert MoleFlowConfig.from_json(tmp_path / "sectioned.json", upgrade=nest_flat_fields) == config
    assert MoleFlowConfig.from_json(tmp_path / "sectioned.json") == config
    with pytest.raises(ValueError, match="unknown config fields"):  # the flat form is read only by its migration
        MoleFlowConfig.from_json(tmp_path / "flat.json")
    assert set(config.to_dict()) >= {"flow", "memory"} and "coreset_min" not in config.to_dict()


@pytest.mark.parametrize("kernel", [0, 5])
def test_without_a_scale_context_each_patch_is_embedded_from_its_own_features(kernel: int) -> None:
    torch.manual_seed(0)
    embedder = FeatureEmbedder(concat_channels=12, dim=8, grid=4, context_kernel=kernel)
    if kernel:  # a trained context: the zero init would hide it
        torch.nn.init.normal_(embedder.context_dw.weight)
    concat = torch.randn(2, 12, 4, 4)
    moved = concat.clone()
    moved[:, :, 0, 0] += 1.0  # one patch changes
    changed = (embedder(concat) - embedder(moved)).abs().sum(dim=1) > 1e-6  # (B,H,W)
    assert changed[:, 0, 0].all()
    assert bool(changed[:, 1, 1].all()) is bool(kernel)  # its neighbour moves only through the context
    assert (sum(p.numel() for p in embedder.parameters()) > 0) is bool(kernel)


@pytest.mark.parametrize("kernel", [-1, 4])
def test_scale_context_kernel_must_be_zero_or_odd(kernel: int) -> None:
    with pytest.raises(ValueError, match="scale_context_kernel"):
        MoleFlowConfig(scale_context_kernel=kernel)


# --- config files: every field type-checked, one line naming the file and the field --------------------
BAD_CONFIGS = [
    ('{"memory": {"coreset_ratio": "x"}}', "config field memory.coreset_ratio must be a finite number, got 'x'"),
    ('{"flow": {"max_steps": "10"}}', "config field flow.max_steps must be an integer, got '10'"),
    ('{"coreset_min": 1.5}', "config field memory.coreset_min must be an integer, got 1.5"),  # the flat form
    ('{"flow": {"max_steps": [10]}}', "config field flow.max_steps must be an integer, got [10]"),
    ('[{"max_steps": 10}]', "a config file is a JSON object of fields, got a list"),
    ('{"max_steps": 10,}', "not a JSON config file (Expecting property name"),
    ('{"memory": {"coreset_ratio": 0}}', "config field memory.coreset_ratio must be in (0, 1], got 0"),
    ('{"memory": 3}', "config section memory must be an object of fields, got 3"),
    ('{"flow": {"step": 3}}', "unknown config fields ['flow.step']"),
    ('{"gaussian": {}}', "unknown config fields ['gaussian']"),
    ('{"gain_normalise": 1}', "config field gain_normalise must be true or false, got 1"),
    ('{"patch_stride": "16"}', "config field patch_stride must be one of 16, 8, got '16'"),
]


@pytest.mark.parametrize(("text", "message"), BAD_CONFIGS)
def test_a_bad_config_file_fails_in_one_line_naming_the_file_and_field(tmp_path: Path, text: str, message: str) -> None:
    from typer.testing import CliRunner

    from moleflow_edge.cli import app

    config, model = tmp_path / "bad.json", tmp_path / "model"
    config.write_text(text)
    result = CliRunner().invoke(app, ["train", "--data", str(tmp_path), "--task", "weave", "--model", str(model),
                                      "--config", str(config), "--device", "cpu", "--threads", "1"])  # fmt: skip
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output  # no traceback
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert errors == [line for line in result.output.splitlines() if "device:" not in line]
    assert len(errors) == 1 and errors[0].startswith(f"error: {config}: {message}")
    assert not model.exists()


def test_every_shipped_config_file_passes_the_checks() -> None:
    for path in sorted((Path(__file__).parent.parent / "configs").glob("*.json")):
        assert MoleFlowConfig.from_json(path) != MoleFlowConfig(), path  # each changes something
