"""Continual trainer: learns one product (task) at a time into a model directory.

Each task gets parts of its detector kind (detectors/: a flow or a memory bank), fitted through
one interface. The model's first task trains the shared parts whatever its own kind
(``fit_shared_parts``), and they stay frozen for good; every later task fits only its own parts. Nothing is written until a task has finished, so a crash or Ctrl-C leaves
the directory exactly as it was.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from moleflow_edge.augment import jpeg_round_trips, photometric_variants
from moleflow_edge.backbones import build_backbone
from moleflow_edge.config import DetectorKind, MoleFlowConfig
from moleflow_edge.data.mvtec import load_split
from moleflow_edge.detectors.base import FitOptions, TrainingSet
from moleflow_edge.detectors.registry import build_model, kind_of
from moleflow_edge.device import amp_dtype, autocast, names_batch_on_oom, resolve_device
from moleflow_edge.errors import InputError
from moleflow_edge.features import FEATURE_BATCH, ImageFeatures, extract_features
from moleflow_edge.locking import locks_folder
from moleflow_edge.model.continual_model import ContinualModel
from moleflow_edge.model_store import ModelDirError, ModelStore
from moleflow_edge.router import fit_prototype
from moleflow_edge.task_check import check_new_task


@dataclass(frozen=True)
class TrainReport:
    """What one task's training did and how long it took."""

    task: str
    detector: DetectorKind
    summary: str  # what the kind's fit learned, in one phrase
    images: int
    holdout_images: int
    feature_seconds: float
    train_seconds: float
    metrics: Mapping[str, float]  # the kind's own figures (a flow's steps, best_step, final_loss)


def prepare_model(store: ModelStore, config: MoleFlowConfig | None, random_backbone: bool = False) -> ContinualModel:
    """The model to add a task to: loaded from the directory, or new with D capped to the backbone."""
    if store.tasks():
        model, _ = store.load(random_backbone=random_backbone)
        if config is not None and _architecture(config) != _architecture(model.config):
            raise ModelDirError(
                f"{store.root} was trained with a different architecture; "
                "later tasks must use the model directory's own config (omit --config/--backbone)"
            )
        return model
    config = config or MoleFlowConfig()
    backbone = build_backbone(config, random_backbone)
    config = config.with_overrides(embed_dim=min(config.embed_dim, backbone.channels8 + backbone.channels16))
    return build_model(config, backbone)


def _architecture(config: MoleFlowConfig) -> tuple[object, ...]:
    """Fields that shape the shared weights (each kind's settings name its own); everything else may
    change between tasks."""
    shared = (
        config.backbone, config.image_size, config.scale_context_kernel, config.router_pooling, config.patch_stride,
        config.gain_normalise, config.positional_encoding,
    )  # fmt: skip
    kinds = tuple(getattr(s, name) for s in config.sections.values() for name in s.ARCHITECTURE)
    return shared + kinds


def holdout_split(count: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, held-out) image indices; at least one image each side once there are 3 or more."""
    held = 0 if fraction == 0 or count < 3 else min(count - 2, max(1, round(fraction * count)))
    order = np.random.default_rng(seed).permutation(count)
    return np.sort(order[held:]), np.sort(order[:held])


def camera_variants(model: ContinualModel, images: np.ndarray) -> list[ImageFeatures]:
    """Features of the images as the line's cameras may deliver them: the originals, then their JPEG
    round trips at each of the CAMERA_JPEG_QUALITIES (what an MJPEG camera sends of a good part)."""
    return [extract_features(model, v) for v in (images, *jpeg_round_trips(images))]


def training_features(model: ContinualModel, images: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """(V,N,Ccat,G,G) patch features of the images (first), their JPEG round trips (unless the
    config's ``augment_jpeg`` is off) and their photometric variants, which both detector kinds
    learn as normal, and (1+Q,N,C) router features of the originals and the round trips: the
    backbone runs once per variant, never per step."""
    cfg = model.config
    camera = camera_variants(model, images)
    lighting = photometric_variants(images, cfg.augment_copies, cfg.augment_strength, cfg.seed)
    learned = camera if cfg.augment_jpeg else camera[:1]
    concat = [f.concat for f in learned] + [extract_features(model, v).concat for v in lighting]
    return torch.stack(concat), np.stack([f.routing for f in camera])


def _batch_hint(arguments: dict[str, object]) -> str:
    """Which batch size to lower after CUDA ran out of memory while training this call's task."""
    store = ModelStore(arguments["model_dir"])  # type: ignore[arg-type]
    if store.tasks():
        now = store.config().section(DetectorKind.FLOW).batch_size
        return (f"flow.batch_size in {store.root / 'config.json'} (now {now}; every later task "
                f"uses the model directory's config)")  # fmt: skip
    config = arguments["config"] or MoleFlowConfig()
    return f"flow.batch_size in the --config JSON (now {config.section(DetectorKind.FLOW).batch_size})"  # type: ignore[union-attr]


@names_batch_on_oom(f"training (flow steps, or the backbone on {FEATURE_BATCH} images at a time)", _batch_hint)
@locks_folder("model_dir", "training")
def train_task(
    data_root: str | Path,
    task: str,
    model_dir: str | Path,
    config: MoleFlowConfig | None = None,
    steps: int | None = None,
    progress: bool = True,
    random_backbone: bool = False,
    device: str | torch.device = "cpu",
    amp: bool = False,
    detector: DetectorKind | str | None = None,
) -> TrainReport:
    """Train ``task`` from ROOT/<task>/train/good and add it to the model directory.

    A flow runs at most ``steps`` optimiser steps on a cosine schedule, checks the loss on held-out
    training images every ``eval_every`` steps, stops after ``patience`` checks without improvement
    and keeps the weights of the best check; a memory task keeps a coreset of its training patches.
    Nothing is written until the task has finished, so a crash leaves the directory as it was.

    Args:
        data_root: a dataset in the MVTec layout; ``data_root/<task>/train/good`` is read.
        task: the product's name, new to the model directory.
        model_dir: the model directory, created with the first task (one ``train`` at a time).
        config: the model's config for its first task; later tasks use the directory's own.
        steps: a flow's most optimiser steps (None: the config's ``flow.max_steps``).
        progress: print the fit's progress.
        random_backbone: random backbone weights (tests and timings only).
        device: auto, cpu, cuda or cuda:N. The saved model is CPU tensors whatever the device.
        amp: on CUDA, float16 autocast for the backbone and flow subnets with a GradScaler (off by
            default: docs/decisions.md#amp-off).
        detector: the task's kind, flow or memory (None: the ``detector`` of the model directory's
            config, or of ``config`` for the first task).

    Returns:
        What the fit did (its kind's summary and metrics), the image counts and the seconds taken.
    """
    check_new_task(data_root, task, model_dir)  # every refusal before any backbone or training work
    if steps is not None and steps < 1:
        raise InputError(f"steps must be >= 1, got {steps}: nothing was trained")
    asked = None if detector is None else DetectorKind(detector)  # a kind that does not exist: refused now
    device = resolve_device(device)
    store = ModelStore(model_dir)
    first = not store.tasks()
    torch.manual_seed((config or MoleFlowConfig()).seed if first else store.config().seed)
    model = prepare_model(store, config, random_backbone).to(device)  # random init here: seeded first
    cfg = model.config
    kind = kind_of(asked or cfg.detector)
    options = FitOptions(steps, device, amp_dtype(device, amp), progress)

    started = time.perf_counter()
    split = load_split(data_root, task, "train", cfg.image_size)
    with autocast(device, options.precision):
        concat, routing = training_features(model, split.images)
    feature_seconds = time.perf_counter() - started
    training = TrainingSet(concat, *holdout_split(len(split.images), cfg.holdout_fraction, cfg.seed))

    if first and not kind.trains_shared_parts:
        fit_shared_parts(model, task, training, options)
    model.add_task(task, kind)
    model.to(device)  # the new task's parameters too
    fitted = kind.fit(model, task, training, options)
    model.eval().cpu()  # saved as CPU tensors whatever the training device
    for p in model.parameters():
        p.requires_grad_(False)

    prototype = fit_prototype(
        routing[0], cfg.router_covariance, cfg.router_ridge, cfg.router_limit_quantile, cfg.router_limit_margin,
        variants=routing[1:],
    )  # fmt: skip
    store.save_task(model, task, replace(prototype, patch_level=fitted.patch_level))
    return TrainReport(
        task, kind.name, fitted.summary, len(split.images), len(training.held), feature_seconds, fitted.seconds,
        fitted.metrics,
    )  # fmt: skip


def fit_shared_parts(model: ContinualModel, task: str, training: TrainingSet, options: FitOptions) -> None:
    """Train the shared parts on the model's first task, for a first task whose own kind does not
    train them: the kind that does (the flow) fits a throwaway task on the same features, which is
    then dropped; the shared parts stay as it left them, frozen for good."""
    trainer = next(k for k in map(kind_of, DetectorKind) if k.trains_shared_parts)
    model.add_task(task, trainer)
    model.to(options.device)
    trainer.fit(model, task, training, options)
    model.remove_task(task)
