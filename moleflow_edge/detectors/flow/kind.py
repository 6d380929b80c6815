"""The flow kind: MoLE-Flow's per-task fit (whitening, then LoRA/WA/DIA by maximum likelihood).

Task 0 trains every shared part with its own parts, then the shared parts are frozen for good;
every later flow task trains only its own LoRA adapters, whitening adapter, mixer gate and DIA
blocks. Training noise goes on the embedding in units of the task's patch spacing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from moleflow_edge.config import DetectorKind, MoleFlowConfig, Whitening
from moleflow_edge.detectors.base import FitOptions, Kind, TaskFit, TrainingSet
from moleflow_edge.detectors.flow.loss import flow_loss
from moleflow_edge.detectors.flow.merged import MergedFlow, merge_task
from moleflow_edge.detectors.flow.parts import (
    TaskParts,
    flow,
    flow_parts,
    new_task_parts,
    patch_scores,
    settings_of,
    shared_parts,
    task_parameters,
)  # fmt: skip
from moleflow_edge.device import autocast
from moleflow_edge.features import patch_spacing
from moleflow_edge.model.continual_model import ContinualModel
from moleflow_edge.router import patch_level


def amp_flow(
    model: ContinualModel, batch: torch.Tensor, task: str, noise: float, device: torch.device, dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embedding and flow subnets under autocast (``dtype`` None: float32); z (B,D,H,W) and log-det
    (B,H,W) come back float32, so the loss and its log-det term are always computed in float32."""
    with autocast(device, dtype):
        z, log_det = flow(model, model.embed(batch), task, noise)
    return z.float(), log_det.float()


@dataclass(frozen=True)
class FlowFit:
    """What the optimiser loop did: steps run, the step whose weights were kept, its loss, seconds."""

    steps: int
    best_step: int
    final_loss: float  # held-out loss at best_step, or the last training loss without a hold-out
    seconds: float


def fit_flow(
    model: ContinualModel,
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
    cfg = settings_of(model.config)
    first_task = model.tasks == [task]
    held_rows = torch.from_numpy(held).to(device)
    for p in model.shared_parameters():
        p.requires_grad_(first_task)
    own, dia = task_parameters(model, task)
    main_group = (model.shared_parameters() if first_task else []) + own
    trained = main_group + dia
    optimizer = torch.optim.AdamW(
        [{"params": main_group, "lr": cfg.lr}, {"params": dia, "lr": cfg.lr * cfg.dia_lr_factor}],
        weight_decay=cfg.weight_decay,
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision is torch.float16)
    generator = torch.Generator().manual_seed(model.config.seed)

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
            raise FloatingPointError(f"training {task!r} diverged (loss {loss.item()}); lower flow.lr in the config")
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
            for p, kept in zip(trained, best_weights, strict=True):
                p.copy_(kept)
    final = best_loss if best_weights is not None else loss_value
    return FlowFit(step, best_step or step, final, time.perf_counter() - started)


class FlowKind(Kind):
    name = DetectorKind.FLOW
    quantizable = True
    trains_shared_parts = True

    def shared_parts(self, config: MoleFlowConfig) -> dict[str, nn.Module | None]:
        return shared_parts(config)

    def new_parts(self, model: ContinualModel, task: str) -> TaskParts:
        return new_task_parts(model, task)

    def fit(self, model: ContinualModel, task: str, training: TrainingSet, options: FitOptions) -> TaskFit:
        cfg = settings_of(model.config)
        concat, fit, held = training.concat, training.fit, training.held
        with torch.no_grad():  # every training variant of the fit images, the originals first
            embedded = model.embed(concat[:, torch.from_numpy(fit).to(options.device)].flatten(0, 1))
            noise = cfg.feature_noise * patch_spacing(embedded[: len(fit)]) if cfg.feature_noise else 0.0
            if cfg.whitening is Whitening.MAHALANOBIS:
                flow_parts(model, task).whitening.fit(embedded, noise)
        fitted = fit_flow(
            model, task, concat, fit, held, options.steps or cfg.max_steps, noise, options.device, options.precision,
            options.progress,
        )  # fmt: skip
        with torch.no_grad():  # the flow's scale on normal images it did not train on (the fit images if none)
            unseen = concat[0][torch.from_numpy(held if len(held) else fit).to(options.device)]
            model.eval()
            level = patch_level(patch_scores(model, model.embed(unseen), task).float().cpu().numpy())
        return TaskFit(
            f"{fitted.steps} steps, kept step {fitted.best_step}, loss {fitted.final_loss:.4f}",
            level,
            fitted.seconds,
            {"steps": fitted.steps, "best_step": fitted.best_step, "final_loss": fitted.final_loss},
        )

    def scorer(self, model: ContinualModel, task: str) -> MergedFlow:
        return merge_task(model, task)


KIND = FlowKind()
