"""Continual trainer: learns one product (task) at a time into a model directory.

Task 0 trains every shared part with its own parts, then the shared parts are frozen for
good; every later task trains only its own LoRA adapters, whitening adapter, mixer gate and
DIA blocks. Nothing is written until a task has finished training, so a crash or Ctrl-C
leaves the directory exactly as it was.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from moleflow_edge.augment import photometric_variants
from moleflow_edge.backbones import build_backbone
from moleflow_edge.config import MoleFlowConfig, Whitening
from moleflow_edge.data.mvtec import load_split
from moleflow_edge.device import amp_dtype, autocast, names_batch_on_oom, resolve_device
from moleflow_edge.features import FEATURE_BATCH, extract_features, patch_spacing
from moleflow_edge.locking import locks_folder
from moleflow_edge.model.loss import flow_loss
from moleflow_edge.model.mole_flow import MoleFlow
from moleflow_edge.model_store import ModelDirError, ModelStore
from moleflow_edge.router import fit_prototype, patch_level
from moleflow_edge.task_check import check_new_task


@dataclass(frozen=True)
class TrainReport:
    """What one task's training did and how long it took."""

    task: str
    images: int
    steps: int  # optimiser steps run
    best_step: int  # the step whose weights were kept (held-out loss lowest)
    holdout_images: int
    feature_seconds: float
    train_seconds: float
    final_loss: float  # held-out loss at best_step, or the last training loss without a hold-out


def prepare_model(store: ModelStore, config: MoleFlowConfig | None, random_backbone: bool = False) -> MoleFlow:
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
    return MoleFlow(config, backbone)


def _architecture(config: MoleFlowConfig) -> tuple[object, ...]:
    """Fields that shape the shared weights; everything else may change between tasks."""
    return (
        config.backbone, config.image_size, config.num_mole_blocks, config.num_dia_blocks, config.lora_rank,
        config.hidden_ratio, config.scale_context_kernel, config.router_pooling, config.patch_stride,
        config.gain_normalise, config.positional_encoding, config.whitening, config.spatial_context,
    )  # fmt: skip


def holdout_split(count: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, held-out) image indices; at least one image each side once there are 3 or more."""
    held = 0 if fraction == 0 or count < 3 else min(count - 2, max(1, round(fraction * count)))
    order = np.random.default_rng(seed).permutation(count)
    return np.sort(order[held:]), np.sort(order[:held])


def training_features(model: MoleFlow, images: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """(V,N,Ccat,G,G) patch features of the images and their photometric variants (V = copies + 1),
    and (N,C) router features of the originals: the backbone runs once per variant, never per step."""
    cfg = model.config
    original = extract_features(model, images)
    variants = photometric_variants(images, cfg.augment_copies, cfg.augment_strength, cfg.seed)
    concat = [original.concat] + [extract_features(model, v).concat for v in variants]
    return torch.stack(concat), original.routing


def amp_flow(
    model: MoleFlow, batch: torch.Tensor, task: str, noise: float, device: torch.device, dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embedding and flow subnets under autocast (``dtype`` None: float32); z (B,D,H,W) and log-det
    (B,H,W) come back float32, so the loss and its log-det term are always computed in float32."""
    with autocast(device, dtype):
        z, log_det = model.flow(model.embed(batch), task, noise)
    return z.float(), log_det.float()


def _batch_hint(arguments: dict[str, object]) -> str:
    """Which batch size to lower after CUDA ran out of memory while training this call's task."""
    store = ModelStore(arguments["model_dir"])  # type: ignore[arg-type]
    if store.tasks():
        return (f"batch_size in {store.root / 'config.json'} (now {store.config().batch_size}; every later task "
                f"uses the model directory's config)")  # fmt: skip
    config = arguments["config"] or MoleFlowConfig()
    return f"batch_size in the --config JSON (now {config.batch_size})"  # type: ignore[union-attr]


@dataclass(frozen=True)
class FlowFit:
    """What the optimiser loop did: steps run, the step whose weights were kept, its loss, seconds."""

    steps: int
    best_step: int
    final_loss: float  # held-out loss at best_step, or the last training loss without a hold-out
    seconds: float


def fit_flow(
    model: MoleFlow,
    task: str,
    concat: torch.Tensor,
    fit: np.ndarray,
    held: np.ndarray,
    max_steps: int,
    noise: float,
    device: torch.device,
    precision: torch.dtype | None,
    progress: bool,
) -> FlowFit:
    """At most ``max_steps`` optimiser steps on a cosine schedule over the fit images' variants, with
    ``noise`` (feature units) added to every training embedding; every
    ``eval_every`` steps the loss on the ``held`` images is checked, training stops after ``patience``
    checks without improvement and the best check's weights are kept. Task 0 trains the shared parts
    too; a later task only its own."""
    cfg = model.config
    first_task = model.tasks == [task]
    held_rows = torch.from_numpy(held).to(device)
    for p in model.shared_parameters():
        p.requires_grad_(first_task)
    own, dia = model.task_parameters(task)
    main_group = (model.shared_parameters() if first_task else []) + own
    trained = main_group + dia
    optimizer = torch.optim.AdamW(
        [{"params": main_group, "lr": cfg.lr}, {"params": dia, "lr": cfg.lr * cfg.dia_lr_factor}],
        weight_decay=cfg.weight_decay,
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision is torch.float16)
    generator = torch.Generator().manual_seed(cfg.seed)

    def held_out_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss = flow_loss(*amp_flow(model, concat[0, held_rows], task, 0.0, device, precision), cfg).item()
        model.train()
        model.backbone.eval()
        return loss

    model.train()
    model.backbone.eval()
    started = time.perf_counter()
    best_loss, best_step, best_weights, since_best = float("inf"), 0, None, 0
    loss_value, step, order = float("nan"), 0, torch.empty(0, dtype=torch.long)
    bar = tqdm(total=max_steps, desc=f"train {task}", unit="step", disable=not progress)
    while step < max_steps:
        if len(order) == 0:
            order = torch.from_numpy(fit)[torch.randperm(len(fit), generator=generator)]
        index, order = order[: cfg.batch_size], order[cfg.batch_size :]
        variant = torch.randint(0, concat.shape[0], (len(index),), generator=generator)
        batch = concat[variant.to(device), index.to(device)]
        loss = flow_loss(*amp_flow(model, batch, task, noise, device, precision), cfg)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training {task!r} diverged (loss {loss.item()}); lower lr in the config")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        schedule.step()
        step += 1
        loss_value = loss.item()
        bar.update(1)
        if len(held) and (step % cfg.eval_every == 0 or step == max_steps):
            current = held_out_loss()
            bar.set_postfix(loss=f"{loss_value:.4f}", held_out=f"{current:.4f}")
            if current < best_loss:
                best_loss, best_step, since_best = current, step, 0
                best_weights = [p.detach().clone() for p in trained]
            else:
                since_best += 1
                if since_best >= cfg.patience:
                    break
    bar.close()
    if best_weights is not None:
        with torch.no_grad():
            for p, kept in zip(trained, best_weights):
                p.copy_(kept)
    final = best_loss if best_weights is not None else loss_value
    return FlowFit(step, best_step or step, final, time.perf_counter() - started)


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
) -> TrainReport:
    """Train ``task`` from ROOT/<task>/train/good and add it to the model directory.

    Runs at most ``steps`` (default: the config's max_steps) optimiser steps on a cosine schedule,
    checks the loss on held-out training images every ``eval_every`` steps, stops after
    ``patience`` checks without improvement and keeps the weights of the best check.
    ``device``: auto, cpu, cuda or cuda:N; on CUDA ``amp`` runs the backbone and flow subnets under
    float16 autocast with a GradScaler (off by default: on an H100 it made a full-size step 1.9x
    slower, benchmarks/README.md). The saved model is CPU tensors whatever the device.
    """
    check_new_task(data_root, task, model_dir)  # every refusal before any backbone or training work
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}: nothing was trained")
    device = resolve_device(device)
    store = ModelStore(model_dir)
    torch.manual_seed((config or MoleFlowConfig()).seed if not store.tasks() else store.config().seed)
    model = prepare_model(store, config, random_backbone).to(device)  # random init here: seeded first
    cfg = model.config
    max_steps = steps or cfg.max_steps

    started = time.perf_counter()
    split = load_split(data_root, task, "train", cfg.image_size)
    precision = amp_dtype(device, amp)
    with autocast(device, precision):
        concat, routing = training_features(model, split.images)
    feature_seconds = time.perf_counter() - started
    fit, held = holdout_split(len(split.images), cfg.holdout_fraction, cfg.seed)

    model.add_task(task)
    model.to(device)  # the new task's parameters too
    with torch.no_grad():  # every training variant of the fit images, the originals first
        embedded = model.embed(concat[:, torch.from_numpy(fit).to(device)].flatten(0, 1))
        noise = cfg.feature_noise * patch_spacing(embedded[: len(fit)]) if cfg.feature_noise else 0.0
        if cfg.whitening == Whitening.MAHALANOBIS.value:
            model.per_task[task].whitening.fit(embedded, noise)
    fitted = fit_flow(model, task, concat, fit, held, max_steps, noise, device, precision, progress)
    model.eval().cpu()  # saved as CPU tensors whatever the training device
    for p in model.parameters():
        p.requires_grad_(False)

    prototype = fit_prototype(
        routing, cfg.router_covariance, cfg.router_ridge, cfg.router_limit_quantile, cfg.router_limit_margin
    )
    with torch.no_grad():  # the flow's scale on normal images it did not train on (the fit images if none)
        unseen = concat[0].cpu()[torch.from_numpy(held if len(held) else fit)]
        level = patch_level(model.patch_scores(model.embed(unseen), task).numpy())
    prototype = replace(prototype, patch_level=level)
    store.save_task(model, task, prototype)
    return TrainReport(
        task,
        len(split.images),
        fitted.steps,
        fitted.best_step,
        len(held),
        feature_seconds,
        fitted.seconds,
        fitted.final_loss,
    )
