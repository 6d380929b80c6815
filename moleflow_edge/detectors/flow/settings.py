"""The flow kind's settings: the ``flow`` section of a model's config (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from moleflow_edge.config import AT_LEAST_0, COUNT, FRACTION, POSITIVE, AnomalyScore, Span, Whitening, check_fields

SPANS: dict[str, Span] = {
    "num_mole_blocks": COUNT, "num_dia_blocks": AT_LEAST_0, "lora_rank": COUNT, "lora_alpha": POSITIVE,
    "hidden_ratio": POSITIVE, "clamp": POSITIVE, "lambda_tail": AT_LEAST_0, "tail_fraction": FRACTION,
    "lambda_logdet": AT_LEAST_0, "lr": POSITIVE, "weight_decay": AT_LEAST_0, "dia_lr_factor": AT_LEAST_0,
    "batch_size": COUNT, "max_steps": COUNT, "eval_every": COUNT, "patience": COUNT, "feature_noise": AT_LEAST_0,
}  # fmt: skip


@dataclass(frozen=True)
class FlowSettings:
    """MoLE-Flow's sizes, loss and optimiser (defaults as the papers', names in comments, or measured)."""

    # fields that shape the shared weights: every later task must use the model directory's values
    ARCHITECTURE: ClassVar[tuple[str, ...]] = (
        "num_mole_blocks", "num_dia_blocks", "lora_rank", "hidden_ratio", "whitening", "spatial_context",
    )  # fmt: skip

    num_mole_blocks: int = 6  # M
    num_dia_blocks: int = 2  # N
    lora_rank: int = 64  # r
    lora_alpha: float = 64.0  # alpha (= r)
    hidden_ratio: float = 1.0  # subnet hidden width = hidden_ratio * D
    clamp: float = 1.9  # soft clamp c
    spatial_context: bool = False  # spatial mixer and context-aware coupling scales (papers'; hurt with feature noise)
    whitening: Whitening = Whitening.MAHALANOBIS  # per-task whitening adapter: mahalanobis or layernorm (papers')
    anomaly_score: AnomalyScore = AnomalyScore.NLL  # nll (-log p, the papers') or latent (0.5 ||z||^2)
    # loss
    lambda_tail: float = 0.0  # tail-aware loss weight (papers' 0.7)
    tail_fraction: float = 0.02  # top k% patches per image
    lambda_logdet: float = 1e-4  # log-det regularisation weight (0 switches it off)
    # optimiser
    lr: float = 1e-3  # papers' 3e-4
    weight_decay: float = 0.01
    dia_lr_factor: float = 0.5  # DIA parameters at half the learning rate
    batch_size: int = 16
    max_steps: int = 600  # optimiser steps per task at most; held-out stopping may stop sooner
    eval_every: int = 25  # steps between held-out checks
    patience: int = 4  # held-out checks without improvement before stopping; the best step is kept
    feature_noise: float = 0.15  # training noise on the embedding, in units of the task's patch spacing

    def __post_init__(self) -> None:
        check_fields(self, SPANS, "flow")


Settings = FlowSettings
