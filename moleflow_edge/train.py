"""Continual trainer: learns one product (task) at a time into a model directory.

Task 0 trains every shared part with its own parts, then the shared parts are frozen for
good; every later task trains only its own LoRA adapters, whitening adapter, mixer gate and
DIA blocks. Nothing is written until a task has finished training, so a crash or Ctrl-C
leaves the directory exactly as it was.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from moleflow_edge.backbones import build_backbone
from moleflow_edge.config import MoleFlowConfig
from moleflow_edge.data.mvtec import load_split
from moleflow_edge.features import extract_features
from moleflow_edge.locking import locks_folder
from moleflow_edge.model.loss import flow_loss
from moleflow_edge.model.mole_flow import MoleFlow
from moleflow_edge.model_store import ModelDirError, ModelStore
from moleflow_edge.router import fit_prototype
from moleflow_edge.task_check import check_new_task


@dataclass(frozen=True)
class TrainReport:
    """What one task's training did and how long it took."""

    task: str
    images: int
    epochs: int
    feature_seconds: float
    train_seconds: float
    final_loss: float

    @property
    def seconds_per_epoch(self) -> float:
        return self.train_seconds / self.epochs


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
    backbone = build_backbone(config.backbone, config.image_size, config.backbone_weights, random_backbone)
    config = config.with_overrides(embed_dim=min(config.embed_dim, backbone.channels8 + backbone.channels16))
    return MoleFlow(config, backbone)


def _architecture(config: MoleFlowConfig) -> tuple[object, ...]:
    """Fields that shape the shared weights; everything else may change between tasks."""
    return (
        config.backbone, config.image_size, config.num_mole_blocks, config.num_dia_blocks, config.lora_rank,
        config.hidden_ratio, config.scale_context_kernel, config.router_pooling,
    )  # fmt: skip


@locks_folder("model_dir", "training")
def train_task(
    data_root: str | Path,
    task: str,
    model_dir: str | Path,
    config: MoleFlowConfig | None = None,
    epochs: int | None = None,
    progress: bool = True,
    random_backbone: bool = False,
) -> TrainReport:
    """Train ``task`` from ROOT/<task>/train/good and add it to the model directory."""
    check_new_task(data_root, task, model_dir)  # every refusal before any backbone or training work
    if epochs is not None and epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}: nothing was trained")
    store = ModelStore(model_dir)
    torch.manual_seed((config or MoleFlowConfig()).seed if not store.tasks() else store.config().seed)
    model = prepare_model(store, config, random_backbone)  # random init happens here: seeded first
    cfg = model.config
    epochs = epochs or cfg.epochs

    started = time.perf_counter()
    split = load_split(data_root, task, "train", cfg.image_size)
    features = extract_features(model, split.images)
    feature_seconds = time.perf_counter() - started

    first_task = not model.tasks
    model.add_task(task)
    for p in model.shared_parameters():
        p.requires_grad_(first_task)
    own, dia = model.task_parameters(task)
    main_group = (model.shared_parameters() if first_task else []) + own
    optimizer = torch.optim.AdamW(
        [{"params": main_group, "lr": cfg.lr}, {"params": dia, "lr": cfg.lr * cfg.dia_lr_factor}],
        weight_decay=cfg.weight_decay,
    )
    steps_per_epoch = math.ceil(len(split.images) / cfg.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(cfg.seed)

    model.train()
    model.backbone.eval()
    started = time.perf_counter()
    bar = tqdm(range(epochs), desc=f"train {task}", unit="epoch", disable=not progress)
    loss_value = float("nan")
    for _ in bar:
        order = torch.randperm(len(split.images), generator=generator)
        for start in range(0, len(order), cfg.batch_size):
            batch = features.concat[order[start : start + cfg.batch_size]]
            loss = flow_loss(*model.flow(model.embed(batch), task), cfg)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training {task!r} diverged (loss {loss.item()}); lower --lr in the config")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_value = loss.item()
        bar.set_postfix(loss=f"{loss_value:.4f}")
    train_seconds = time.perf_counter() - started
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)

    prototype = fit_prototype(
        features.routing, cfg.router_covariance, cfg.router_ridge, cfg.router_limit_quantile, cfg.router_limit_margin
    )
    store.save_task(model, task, prototype)
    return TrainReport(task, len(split.images), epochs, feature_seconds, train_seconds, loss_value)
