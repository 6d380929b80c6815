"""Greedy k-center coreset: the memory bank a memory task keeps of its training patches.

PatchCore's reduction: each next vector kept is the one farthest from every vector kept so far,
so the kept set covers the training patches with the smallest radius greedy search finds. Each
step passes over every candidate, so above ``PARTITION_FROM`` candidates (a 67-image product with its
variants) the search runs in k-means partitions of about ``PARTITION``: each step takes the farthest
candidate of the partition whose farthest is farthest, and passes over that partition alone. Below
it the global search is kept (measurements: docs/decisions.md#coreset-partitions).
extend_coreset continues a greedy search from a bank already kept (the photometric variants
farthest from every original patch).
"""

from __future__ import annotations

import math

import torch

from moleflow_edge.detectors.memory.inverted_lists import kmeans, nearest_centroid

PARTITION_FROM = 65536  # candidates from which the greedy search runs in partitions
PARTITION = 4096  # candidates per partition there
FIT_ROWS = 64  # candidates per partition that fit the partitions' k-means (a seeded sample)
CHUNK = 65536  # rows per distance update, so a 200-image product with variants stays small in memory
CHECK = 256  # rows whose exact distance to the bank extend_coreset computes at once


def coreset_size(count: int, ratio: float, minimum: int, maximum: int) -> int:
    """How many of ``count`` vectors to keep: ``ratio`` of them, at least ``minimum`` (or all there
    are), at most ``maximum``."""
    return min(count, maximum, max(minimum, math.ceil(ratio * count)))


@torch.no_grad()
def greedy_coreset(vectors: torch.Tensor, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of ``count`` rows of ``vectors`` (N,D) chosen by greedy k-center from a seeded first
    row, and each row's distance to its nearest kept row (N,): their max is the covering radius.
    From ``PARTITION_FROM`` rows, by partitions: the distance is then to the nearest kept row of the
    row's own partition (never less than the true one).

    Deterministic for a seed; the kept rows for a smaller count are a prefix of those for a larger
    one, so the covering radius never grows with ``count``.
    """
    n = len(vectors)
    if not 1 <= count <= n:
        raise ValueError(f"a coreset of {count} from {n} vectors: count must be in [1, {n}]")
    vectors = vectors.float()
    if n < PARTITION_FROM:
        return _greedy(vectors, count, seed)
    parts = math.ceil(n / PARTITION)
    sample = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: FIT_ROWS * parts]
    owner = nearest_centroid(vectors, kmeans(vectors[sample], parts, seed))
    order = torch.argsort(owner, stable=True)  # partitions as contiguous blocks of rows
    grouped, ends = vectors[order], torch.cumsum(torch.bincount(owner), 0).tolist()
    blocks = [slice(start, end) for start, end in zip([0, *ends[:-1]], ends, strict=True) if end > start]
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


@torch.no_grad()
def extend_coreset(candidates: torch.Tensor, bank: torch.Tensor, bound: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of ``count`` rows of ``candidates`` (N,D) (all of them if fewer) chosen by greedy
    k-center continued from ``bank`` (K,D): each next row is the one farthest from the bank and from
    the rows chosen before it. Deterministic (no seed: the bank is the start).

    ``bound`` (N,) bounds each row's distance to the bank from above (a photometric variant's
    distance to its own original patch). The search is lazy: only the rows that lead the bounds get
    their exact distance to the bank, ``CHECK`` at a time, until the leader's is exact; the choice is
    the one full distances would give, without the (N,K) product that takes minutes for a
    300-image product.
    """
    count = min(count, len(candidates))
    candidates, bank = candidates.float(), bank.float()
    nearest = bound.float().pow(2)  # squared, exact where ``known``
    known = torch.zeros(len(candidates), dtype=torch.bool)
    bank_t, bank_sq = bank.T.contiguous(), bank.pow(2).sum(dim=1)
    squares = candidates.pow(2).sum(dim=1)
    chosen = torch.empty(count, dtype=torch.long)
    for i in range(count):
        while not known[index := int(nearest.argmax())]:
            # the leading rows not yet exact (known ones rank last): never empty while the leader is
            # unknown, even where more than CHECK rows tie with it
            lead = torch.topk(nearest.masked_fill(known, -1.0), min(CHECK, len(nearest))).indices
            lead = lead[~known[lead]]
            rows = candidates[lead]
            exact = (rows.pow(2).sum(dim=1, keepdim=True) + (rows @ bank_t).mul_(-2) + bank_sq).amin(dim=1)
            nearest[lead] = torch.minimum(nearest[lead], exact.clamp_min(0.0))
            known[lead] = True
        chosen[i] = index
        row = candidates[index]
        to_row = torch.addmv(squares + row.dot(row), candidates, row, alpha=-2.0)  # one pass, no (N,D) copy
        torch.minimum(nearest, to_row.clamp_min_(0.0), out=nearest)
    return chosen
