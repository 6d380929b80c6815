"""How far inverted lists are from the cost target: where each patch's nearest vector lies, measured.

The memory cost bench times the deployed search; this study asks what any inverted-list search
over the same bank would need. On the bench's bank of real patch vectors (memory_cost_bench.py
--data: every training image of ROOT with its photometric variants and mirrors, a bank of whole
images) and its query patches, it prints:
  1. for lists of 128, 64 and 32 vectors, the share of query patches whose exact nearest vector lies
     in one of the P lists whose centroids are nearest the patch (P = 1 ... 64): what a per-patch
     probe of P lists can be exact on at best;
  2. a search that gathers each list once per image instead of once per patch: the M lists that
     most of an image's patches ask for (each patch asks for its P nearest), each searched for the
     Q patches nearest its centroid (those that asked first): its exact share, share within 1%,
     patches it leaves unanswered and the lists an image asks for (union).

    python benchmarks/memory_search_study.py --data ../shared/data/real-dev [--bank 100000]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from memory_cost_bench import real_vectors

from moleflow_edge.backbones import build_backbone
from moleflow_edge.config import MoleFlowConfig
from moleflow_edge.detectors.memory.inverted_lists import inverted_lists
from moleflow_edge.detectors.registry import build_model

PROBES = (1, 2, 4, 8, 16, 32, 64)
PER_IMAGE = ((4, 128, 16), (8, 128, 16), (8, 256, 16), (8, 256, 32), (16, 256, 32), (16, 512, 16))  # P, M, Q


def squared_to(rows: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """(N,K) squared distances, expanded, in chunks of rows."""
    sq = bank.pow(2).sum(dim=1)
    return torch.cat([(r.pow(2).sum(1, keepdim=True) - 2 * r @ bank.T + sq).clamp_min(0) for r in rows.split(512)])


def per_image_search(x: torch.Tensor, centroids: torch.Tensor, members: torch.Tensor, bank: torch.Tensor,
                     probe: int, lists: int, patches: int) -> tuple[torch.Tensor, int]:  # fmt: skip
    """One image's patches (HW,D): squared nearest distances (inf where no chosen list took the patch)
    and how many lists its patches asked for."""
    coarse = squared_to(x, centroids)  # (HW,C)
    asked = coarse <= coarse.topk(probe, dim=1, largest=False).values[:, -1:]
    chosen = (asked.sum(dim=0) - coarse.amin(dim=0) / (coarse.max() + 1)).topk(min(lists, len(centroids))).indices
    order = coarse[:, chosen].T - coarse.max() * 2 * asked[:, chosen].T  # askers first, then nearest
    taken = order.topk(min(patches, len(x)), dim=1, largest=False).indices  # (M,Q)
    vectors = bank[members[chosen]]  # (M,L,D)
    distance = (x[taken].pow(2).sum(2, keepdim=True) - 2 * x[taken] @ vectors.transpose(1, 2)
                + vectors.pow(2).sum(2)[:, None, :]).amin(dim=2)  # fmt: skip
    best = torch.full((len(x),), float("inf")).scatter_reduce(0, taken.flatten(), distance.flatten(), "amin")
    return best.clamp_min(0), int(asked.any(dim=0).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--bank", type=int, default=100_000, help="bank size (whole images, seeded choice)")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = MoleFlowConfig()
    backbone = build_backbone(config)
    config = config.with_overrides(embed_dim=min(config.embed_dim, backbone.channels8 + backbone.channels16))
    model = build_model(config, backbone).eval()
    per_image = config.grid_size**2
    with torch.no_grad():
        candidates, queries = real_vectors(model, args.data)
        queries = (queries - model.embedder.position).permute(0, 2, 3, 1).reshape(-1, queries.shape[1])
        chosen = torch.randperm(len(candidates) // per_image, generator=torch.Generator().manual_seed(config.seed))
        bank = candidates[(chosen[:, None] * per_image + torch.arange(per_image)).flatten()[: args.bank]]
        bank = bank.half().float()  # as a listed bank is kept
        centre = bank.mean(dim=0)
        bank, queries = bank - centre, queries - centre
        exact = squared_to(queries, bank)
        nearest, exact = exact.argmin(dim=1), exact.amin(dim=1)
        print(f"bank {len(bank)} vectors, {len(queries)} query patches ({len(queries) // per_image} images)")
        for size in (128, 64, 32):
            centroids, members = inverted_lists(bank, size, config.seed)
            owner = torch.empty(len(bank), dtype=torch.long)
            owner[members.flatten().long()] = torch.arange(len(members)).repeat_interleave(members.shape[1])
            coarse = squared_to(queries, centroids)
            rank = (coarse < coarse.gather(1, owner[nearest][:, None])).sum(dim=1)
            shares = ", ".join(f"{p}: {float((rank < p).float().mean()):.4f}" for p in PROBES)
            print(f"lists of {size} ({len(centroids)} lists): nearest vector within the P nearest lists: {shares}")
        centroids, members = inverted_lists(bank, 128, config.seed)
        members = members.long()
        for probe, lists, patches in PER_IMAGE:
            found, unions = zip(*[per_image_search(x, centroids, members, bank, probe, lists, patches)
                                  for x in queries.view(-1, per_image, queries.shape[1])], strict=True)  # fmt: skip
            got = torch.cat(found)
            answered = torch.isfinite(got)
            ratio = (got.sqrt() / exact.sqrt().clamp_min(1e-12))[answered]
            print(f"per image, P {probe}, M {lists} lists, Q {patches} patches each: exact "
                  f"{float((ratio <= 1 + 1e-4).sum()) / len(got):.4f}, within 1% {float((ratio <= 1.01).sum()) / len(got):.4f}, "
                  f"unanswered {int((~answered).sum())}, lists asked per image mean {sum(unions) / len(unions):.0f} max {max(unions)}")  # fmt: skip


if __name__ == "__main__":
    main()
