"""Greedy k-center coreset: the memory bank a memory task keeps of its training patches.

PatchCore's reduction: each next vector kept is the one farthest from every vector kept so far,
so the kept set covers the training patches with the smallest radius greedy search finds. Its
cost is what matters on the line: a memory graph's time grows linearly with the vectors kept.
"""

from __future__ import annotations

import math

import torch

CHUNK = 65536  # rows per distance update, so a 200-image product with variants stays small in memory


def coreset_size(count: int, ratio: float, minimum: int, maximum: int) -> int:
    """How many of ``count`` vectors to keep: ``ratio`` of them, at least ``minimum`` (or all there
    are), at most ``maximum``."""
    return min(count, maximum, max(minimum, math.ceil(ratio * count)))


@torch.no_grad()
def greedy_coreset(vectors: torch.Tensor, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of ``count`` rows of ``vectors`` (N,D) chosen by greedy k-center from a seeded first
    row, and each row's distance to its nearest kept row (N,): their max is the covering radius.

    Deterministic for a seed; the kept rows for a smaller count are a prefix of those for a larger
    one, so the covering radius never grows with ``count``.
    """
    n = len(vectors)
    if not 1 <= count <= n:
        raise ValueError(f"a coreset of {count} from {n} vectors: count must be in [1, {n}]")
    vectors = vectors.float()
    first = int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(seed)))
    kept = torch.empty(count, dtype=torch.long)
    nearest = torch.full((n,), float("inf"))
    # the same arithmetic as (rows - centre).pow(2).sum(1), into buffers made once: a fresh tensor per
    # step and chunk cost a page-faulted allocation each, which made this loop about 4x slower
    diff, squared = torch.empty(min(n, CHUNK), vectors.shape[1]), torch.empty(min(n, CHUNK))  # float32, as vectors
    index = first
    for i in range(count):
        kept[i] = index
        centre = vectors[index]
        for start in range(0, n, CHUNK):
            rows = vectors[start : start + CHUNK]
            d, s = diff[: len(rows)], squared[: len(rows)]
            torch.sub(rows, centre, out=d)
            torch.sum(d.mul_(d), dim=1, out=s)
            torch.minimum(nearest[start : start + len(rows)], s, out=nearest[start : start + len(rows)])
        index = int(nearest.argmax())
    return kept, nearest.sqrt()
