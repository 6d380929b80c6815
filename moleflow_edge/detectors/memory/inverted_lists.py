"""Inverted lists over a memory bank: a patch's nearest kept vector without comparing it with all.

faiss's IVF search as static-shape graph ops: k-means centroids partition the bank; a patch's
distances to the centroids (MatMul) pick its ``probe`` nearest lists (TopK), whose vectors
(Gather, every list padded to one length with copies of its own first member, so padding never
changes a minimum) give exact distances (MatMul, ReduceMin). A patch whose nearest vector lies in
a list it did not probe gets a slightly larger distance. The k-means fits on a seeded sample of
``FIT_ROWS`` rows per list, then assigns every row (why: docs/decisions.md#kmeans-on-a-sample).
"""

from __future__ import annotations

import math

import torch

from moleflow_edge.model.scorer import PatchScorer

CHUNK = 65536  # rows per assignment step, so 300,000 candidates stay small in memory
FIT_ROWS = 32  # rows per list in the sample the lists' k-means fits on
GATHER_BYTES = 512 * 2**20  # at most this much of gathered lists per torch search (InvertedListScorer)


def list_count(bank_size: int, list_size: int) -> int:
    """How many lists give lists of about ``list_size`` vectors."""
    return max(1, math.ceil(bank_size / list_size))


@torch.no_grad()
def nearest_centroid(vectors: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(N,) index of each row's nearest centroid (expanded squared distances, chunked)."""
    cross, sq = -2.0 * centroids.T, centroids.pow(2).sum(dim=1)
    return torch.cat([torch.argmin(rows @ cross + sq, dim=1) for rows in vectors.split(CHUNK)])


@torch.no_grad()
def kmeans(vectors: torch.Tensor, count: int, seed: int, iterations: int = 10) -> torch.Tensor:
    """``count`` (or fewer, if some empty out) k-means centroids of ``vectors`` (N,D), Lloyd's
    iterations from a seeded choice of rows: deterministic for a seed."""
    vectors = vectors.float()
    if not 1 <= count <= len(vectors):
        raise ValueError(f"{count} lists for {len(vectors)} vectors: the count must be in [1, {len(vectors)}]")
    start = torch.randperm(len(vectors), generator=torch.Generator().manual_seed(seed))[:count]
    centroids = vectors[start].clone()
    for _ in range(iterations):
        owner = nearest_centroid(vectors, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, owner, vectors)
        sizes = torch.bincount(owner, minlength=len(centroids))
        filled = sizes > 0
        centroids = sums[filled] / sizes[filled, None]
    return centroids


def _split(members: torch.Tensor, bank: torch.Tensor, longest: int) -> list[torch.Tensor]:
    """``members`` (bank rows) cut into pieces of at most ``longest`` along their principal axis,
    so that no list pads every other to its length."""
    if len(members) <= longest:
        return [members]
    rows = bank[members] - bank[members].mean(dim=0)
    axis = torch.linalg.svd(rows, full_matrices=False).Vh[0]
    ordered = members[torch.argsort(rows @ axis, stable=True)]
    return list(ordered.tensor_split(math.ceil(len(members) / longest)))


@torch.no_grad()
def inverted_lists(bank: torch.Tensor, list_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``centroids`` (C,D) and ``lists`` (C,L) of ``bank`` (K,D): k-means (fitted on a seeded sample)
    into lists of about ``list_size`` rows, longer ones cut to at most ``list_size`` (so L is
    ``list_size`` and a probe gathers little padding), each list's bank rows padded with its first
    row; a centroid is its list's mean. Every bank row is in exactly one list."""
    bank = bank.float()
    count = list_count(len(bank), list_size)
    sample = torch.randperm(len(bank), generator=torch.Generator().manual_seed(seed))[: FIT_ROWS * count]
    owner = nearest_centroid(bank, kmeans(bank[sample], count, seed))
    pieces = [p for c in torch.unique(owner) for p in _split(torch.nonzero(owner == c).flatten(), bank, list_size)]
    length = max(len(p) for p in pieces)
    lists = torch.stack([torch.cat([p, p[:1].expand(length - len(p))]) for p in pieces])
    return torch.stack([bank[p].mean(dim=0) for p in pieces]), lists.int()


class InvertedListScorer(PatchScorer):
    """embedding (B,D,H,W) -> patch_scores (B,H,W), image_score (B,): MemoryScorer's distances,
    searched in the ``probe`` lists whose centroids are nearest each patch.

    As MemoryScorer, vectors are centred on the bank's mean and distances expanded; each list is
    stored as its (D,L) block of -2 x vectors and its (L,) squared norms so one Gather fetches it.
    """

    def __init__(
        self, bank: torch.Tensor, centroids: torch.Tensor, lists: torch.Tensor, probe: int, position: torch.Tensor
    ) -> None:
        super().__init__()
        bank = bank.detach().float()
        centre = bank.mean(dim=0)
        centred, middles = bank - centre, centroids.detach().float() - centre
        self.probe = min(probe, len(middles))
        self.register_buffer("offset", position.detach().float() + centre[None, :, None, None])  # (1,D,H,W)
        self.register_buffer("centroid_cross", -2.0 * middles.T.contiguous())  # (D,C)
        self.register_buffer("centroid_sq", middles.pow(2).sum(dim=1))  # (C,)
        lists = lists.long()
        self.register_buffer("list_cross", -2.0 * centred[lists].transpose(1, 2).contiguous())  # (C,D,L)
        self.register_buffer("list_sq", centred.pow(2).sum(dim=1)[lists])  # (C,L)

    def forward(self, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.compiler.is_exporting():  # the graph: one search over the whole (dynamic) batch
            return self._search(embedding)
        # in torch, a few images at a time: each patch gathers probe x L vectors, 122 MB an image at
        # 14x14 and 4x that at 28x28, so eval's whole test split at once ran out of memory
        per_image = embedding.shape[2] * embedding.shape[3] * self.probe * self.list_cross[0].nbytes  # one list a probe
        parts = [self._search(images) for images in embedding.split(max(1, GATHER_BYTES // per_image))]
        return torch.cat([patch for patch, _ in parts]), torch.cat([image for _, image in parts])

    def _search(self, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = embedding.shape[2:]
        x = (embedding - self.offset).flatten(2).transpose(1, 2)  # (B,HW,D)
        coarse = x @ self.centroid_cross + self.centroid_sq  # (B,HW,C)
        probed = torch.topk(coarse, self.probe, dim=2, largest=False).indices  # (B,HW,P)
        products = x[:, :, None, None, :] @ self.list_cross[probed]  # (B,HW,P,1,L)
        nearest = torch.amin((products.squeeze(3) + self.list_sq[probed]).flatten(2), dim=2)  # (B,HW)
        patch_scores = (x.pow(2).sum(dim=2) + nearest).clamp_min(0.0).sqrt().reshape(-1, height, width)
        return patch_scores, patch_scores.flatten(1).amax(dim=1)
