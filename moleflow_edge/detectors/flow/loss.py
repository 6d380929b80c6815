"""Training objective: tail-aware per-patch NLL plus a switchable log-det regulariser."""

from __future__ import annotations

import math

import torch

from moleflow_edge.detectors.flow.parts import nll_from_latent
from moleflow_edge.detectors.flow.settings import FlowSettings


def flow_loss(z: torch.Tensor, log_det: torch.Tensor, config: FlowSettings) -> torch.Tensor:
    """(1 - lambda_tail) mean NLL/D + lambda_tail mean of each image's top k% NLL/D
    + lambda_logdet mean (log|det J| / D)^2.

    The tail term keeps training pushing on the hardest normal patches, which is where false
    alarms come from; the log-det term (our form; the papers name only its weight) stops the
    flow from buying likelihood with ever larger Jacobians.
    """
    dim = z.shape[1]
    nll = nll_from_latent(z, log_det).flatten(1) / dim  # (B, H*W)
    k = max(1, math.ceil(config.tail_fraction * nll.shape[1]))
    tail = nll.topk(k, dim=1).values.mean()
    loss = (1 - config.lambda_tail) * nll.mean() + config.lambda_tail * tail
    if config.lambda_logdet > 0:
        loss = loss + config.lambda_logdet * (log_det / dim).pow(2).mean()
    return loss
