"""Greedy k-center coreset: the memory bank a memory task keeps of its training patches.

PatchCore's reduction: each next vector kept is the one farthest from every vector kept so far,
so the kept set covers the training patches with the smallest radius greedy search finds. Each
step passes over every candidate, so above ``PARTITION`` candidates (a 5-image product with its
variants) the search runs in k-means partitions of about that many: each step takes the farthest
candidate of the partition whose farthest is farthest, and passes over that partition alone
(measured: benchmarks/README.md).
"""

from __future__ import annotations

import math

import torch

from moleflow_edge.model.inverted_lists import kmeans, nearest_centroid

PARTITION = 4096  # candidates per partition of the greedy search above this many
FIT_ROWS = 64  # candidates per partition that fit the partitions' k-means (a seeded sample)
CHUNK = 65536  # rows per distance update, so a 200-image product with variants stays small in memory


def coreset_size(count: int, ratio: float, minimum: int, maximum: int) -> int:
    """How many of ``count`` vectors to keep: ``ratio`` of them, at least ``minimum`` (or all there
    are), at most ``maximum``."""
    return min(count, maximum, max(minimum, math.ceil(ratio * count)))


@torch.no_grad()
def greedy_coreset(vectors: torch.Tensor, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of ``count`` rows of ``vectors`` (N,D) chosen by greedy k-center from a seeded first
    row, and each row's distance to its nearest kept row (N,): their max is the covering radius.
    Above ``PARTITION`` rows, by partitions: the distance is then to the nearest kept row of the
    row's own partition (never less than the true one).

    Deterministic for a seed; the kept rows for a smaller count are a prefix of those for a larger
    one, so the covering radius never grows with ``count``.
    """
    n = len(vectors)
    if not 1 <= count <= n:
        raise ValueError(f"a coreset of {count} from {n} vectors: count must be in [1, {n}]")
    vectors = vectors.float()
    parts = math.ceil(n / PARTITION)
    if parts == 1:
        return _greedy(vectors, count, seed)
    sample = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: FIT_ROWS * parts]
    owner = nearest_centroid(vectors, kmeans(vectors[sample], parts, seed))
    order = torch.argsort(owner, stable=True)  # partitions as contiguous blocks of rows
    grouped, ends = vectors[order], torch.cumsum(torch.bincount(owner), 0).tolist()
    blocks = [slice(start, end) for start, end in zip([0, *ends[:-1]], ends) if end > start]
    generator = torch.Generator().manual_seed(seed)
    following = [b.start + int(torch.randint(b.stop - b.start, (1,), generator=generator)) for b in blocks]
    nearest = torch.full((n,), float("inf"))
    farthest = torch.full((len(blocks),), float("inf"))  # each partition's covering radius (squared)
    kept = torch.empty(count, dtype=torch.long)
    for i in range(count):
        part = int(farthest.argmax())
        block, kept[i] = blocks[part], following[part]
        nearest[block] = torch.minimum(nearest[block], (grouped[block] - grouped[kept[i]]).pow(2).sum(dim=1))
        at = int(nearest[block].argmax())
        farthest[part], following[part] = nearest[block.start + at], block.start + at
    distance = torch.empty(n)
    distance[order] = nearest.sqrt()
    return order[kept], distance


def _greedy(vectors: torch.Tensor, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """greedy_coreset over all rows at once."""
    n = len(vectors)
    first = int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(seed)))
    kept = torch.empty(count, dtype=torch.long)
    nearest = torch.full((n,), float("inf"))
    index = first
    for i in range(count):
        kept[i] = index
        centre = vectors[index]
        for start in range(0, n, CHUNK):
            rows = slice(start, start + CHUNK)
            nearest[rows] = torch.minimum(nearest[rows], (vectors[rows] - centre).pow(2).sum(dim=1))
        index = int(nearest.argmax())
    return kept, nearest.sqrt()
