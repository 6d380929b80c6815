"""The memory kind: a bank of the task's training patch embeddings, searched for the nearest.

The candidates are the patches of the task's training images (the same gain-normalised features a
flow trains on, positional encoding removed) and of their photometric variants (and, with
``augment_jpeg``, their JPEG round trips). The bank keeps ``coreset_ratio`` of the images' own
patches within [``coreset_min``, ``coreset_max``] (every one by default, as the full-bank kNN
reference does; a greedy k-center coreset where fewer), then the ``variant_cover`` variant patches
farthest from them by the same greedy search continued (extend_coreset): the brighter and darker
normal patches no original patch covers. Measurements: docs/decisions.md#memory-bank-candidates.
A bank of ``memory_lists_from`` vectors or more is searched by inverted lists (inverted_lists.py),
where exact search costs more, and kept in float16. Nothing shared is trained, so a memory task
never changes what earlier tasks score.
"""

from __future__ import annotations

import time

import torch

from moleflow_edge.config import DetectorKind
from moleflow_edge.detectors.base import FitOptions, Kind, TaskFit, TrainingSet
from moleflow_edge.detectors.memory.bank import MemoryBank, MemoryScorer
from moleflow_edge.detectors.memory.coreset import coreset_size, extend_coreset, greedy_coreset
from moleflow_edge.detectors.memory.inverted_lists import InvertedListScorer, inverted_lists
from moleflow_edge.detectors.memory.settings import MemorySettings
from moleflow_edge.model.continual_model import ContinualModel
from moleflow_edge.model.scorer import PatchScorer
from moleflow_edge.router import patch_level


def patch_vectors(model: ContinualModel, concat: torch.Tensor) -> torch.Tensor:
    """(N,Ccat,H,W) patch maps -> (N*H*W, D) embedded patch vectors without the positional encoding."""
    embedded = model.embed(concat) - model.embedder.position
    return embedded.permute(0, 2, 3, 1).reshape(-1, embedded.shape[1]).float().cpu()


def settings_of(model: ContinualModel) -> MemorySettings:
    """The memory section of ``model``'s config."""
    return model.config.section(DetectorKind.MEMORY)


class MemoryKind(Kind):
    name = DetectorKind.MEMORY
    quantizable = False

    def new_parts(self, model: ContinualModel, task: str) -> MemoryBank:
        """An empty bank, filled by the fit."""
        return MemoryBank(model.config.embed_dim)

    def fit(self, model: ContinualModel, task: str, training: TrainingSet, options: FitOptions) -> TaskFit:
        started = time.perf_counter()
        cfg, seed = settings_of(model), model.config.seed
        originals = training.concat[0]
        images, patches_per_image = originals.shape[0], originals.shape[2] * originals.shape[3]
        with torch.no_grad():
            vectors = patch_vectors(model, training.concat.flatten(0, 1))  # variant-major: (V*N*H*W, D)
            own, variants = vectors[: images * patches_per_image], vectors[images * patches_per_image :]
            count = coreset_size(len(own), cfg.coreset_ratio, cfg.coreset_min, cfg.coreset_max)
            if count == len(own):
                kept, to_kept = torch.arange(count), torch.zeros(len(own))
            else:
                kept, to_kept = greedy_coreset(own, count, seed)
            # a variant's distance to the bank is at most its own original's plus that one's to the bank
            copies = variants.view(-1, *own.shape)  # (V-1,N*H*W,D): variant v of patch i is row i of copy v
            bound = (copies - own).norm(dim=2).add_(to_kept).flatten()
            extra = extend_coreset(variants, own[kept], bound, cfg.variant_cover) + len(own)
            kept = torch.cat([kept, extra])
            bank = vectors[kept]
            parts = model.per_task[task]
            assert isinstance(parts, MemoryBank)
            searched = "exact search"
            if len(bank) >= cfg.memory_lists_from:
                bank = bank.half().float()  # as the task file keeps it: every score from the saved bank
                centroids, lists = inverted_lists(bank, cfg.memory_list_size, seed)
                parts.centroids, parts.lists = centroids.to(options.device), lists.to(options.device)
                searched = f"{len(centroids)} inverted lists of <= {lists.shape[1]}, {cfg.memory_probe} searched"
            parts.bank = (bank.half() if parts.searched_by_lists else bank).to(options.device)
            # the normal scale: held-out images against the kept vectors that other images gave
            others = ~torch.isin(kept // patches_per_image % images, torch.from_numpy(training.held))
            if len(training.held) and bool(others.any()):
                unseen, reference = training.held, bank[others]
            else:
                unseen, reference = training.fit, bank
            scorer = MemoryScorer(reference, model.embedder.position.cpu())  # exact: lists cover the whole bank
            patch, _ = scorer(model.embed(originals[torch.from_numpy(unseen).to(originals.device)]).cpu())
        return TaskFit(
            f"kept {count} of {len(own)} patch vectors of the images ({'all' if count == len(own) else 'greedy k-center coreset'}) "
            f"and the {len(extra)} of {len(variants)} of their variants farthest from them; {searched}",
            patch_level(patch.numpy()),
            time.perf_counter() - started,
        )

    def scorer(self, model: ContinualModel, task: str) -> PatchScorer:
        """The task's search as deployed: by its inverted lists where it has them, else exact."""
        parts = model.per_task[task]
        if not isinstance(parts, MemoryBank):
            raise KeyError(f"task {task!r} is a {model.kind(task).value} task, not a memory task")
        position = model.embedder.position
        if parts.searched_by_lists:
            return InvertedListScorer(
                parts.bank, parts.centroids, parts.lists, settings_of(model).memory_probe, position
            )
        return MemoryScorer(parts.bank, position)


KIND = MemoryKind()
