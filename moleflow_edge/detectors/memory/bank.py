"""A memory task: its coreset of training patch vectors, and the module that scores against it.

The memory detector reads the same shared embedding a flow does, less its constant positional
encoding (why: docs/decisions.md#memory-no-positional-encoding), so it needs no graph output of its own. A patch's score is the Euclidean distance to its nearest kept
vector; the image score is the largest patch score, as PatchCore's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moleflow_edge.model.scorer import PatchScorer


class MemoryBank(nn.Module):
    """A memory task's own part: ``bank`` (K,D) kept patch vectors, positional encoding removed, and
    for a large bank its inverted lists (inverted_lists.py): ``centroids`` (C,D) and ``lists``
    (C,L) of bank rows. A bank without lists is searched exactly, and its task file holds ``bank``
    alone in float32. A bank with lists keeps ``bank`` in float16 (``lists`` in int32); scorers
    compute in float32 (docs/decisions.md#float16-listed-banks).

    K, C and L differ from task to task, so loading a saved bank takes their shapes from the file.
    """

    LISTS = ("centroids", "lists")

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("bank", torch.zeros(0, dim))
        self.register_buffer("centroids", torch.zeros(0, dim))
        self.register_buffer("lists", torch.zeros(0, 0, dtype=torch.int32))
        self._register_state_dict_hook(self._drop_empty_lists)
        self._register_load_state_dict_pre_hook(self._take_saved_shape)

    @property
    def searched_by_lists(self) -> bool:
        return len(self.centroids) > 0

    @staticmethod
    def _drop_empty_lists(module: MemoryBank, state: dict[str, Any], prefix: str, *_: Any) -> None:
        if not module.searched_by_lists:
            for name in MemoryBank.LISTS:
                del state[prefix + name]

    def _take_saved_shape(self, state: dict[str, Any], prefix: str, *_: Any) -> None:
        if prefix + "bank" in state and prefix + "centroids" not in state:  # an exact bank's file
            state[prefix + "centroids"] = torch.zeros(0, self.bank.shape[1])
            state[prefix + "lists"] = torch.zeros(0, 0, dtype=torch.int32)
        for name in ("bank", *self.LISTS):
            saved = state.get(prefix + name)
            if saved is not None:
                setattr(self, name, torch.empty_like(saved))


class MemoryScorer(PatchScorer):
    """embedding (B,D,H,W) -> patch_scores (B,H,W), image_score (B,): what export writes for a memory task.

    Distances are matrix products and a ReduceMin (no cdist), in the expanded form
    ||x - b||^2 = ||x||^2 + min_b(||b||^2 - 2 x.b), with x and the bank centred on the bank's mean
    so that fp16 keeps the small distances of normal patches.
    """

    def __init__(self, bank: torch.Tensor, position: torch.Tensor) -> None:
        super().__init__()
        bank = bank.detach().float()
        centre = bank.mean(dim=0)
        centred = bank - centre
        self.register_buffer("offset", position.detach().float() + centre[None, :, None, None])  # (1,D,H,W)
        self.register_buffer("cross", -2.0 * centred.T.contiguous())  # (D,K)
        self.register_buffer("bank_sq", centred.pow(2).sum(dim=1))  # (K,)

    def forward(self, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = embedding.shape[2:]
        x = (embedding - self.offset).flatten(2).transpose(1, 2)  # (B,HW,D)
        nearest = torch.amin(x @ self.cross + self.bank_sq, dim=2)  # (B,HW)
        patch_scores = (x.pow(2).sum(dim=2) + nearest).clamp_min(0.0).sqrt().reshape(-1, height, width)
        return patch_scores, patch_scores.flatten(1).amax(dim=1)
