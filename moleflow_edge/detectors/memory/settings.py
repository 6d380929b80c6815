"""The memory kind's settings: the ``memory`` section of a model's config (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from moleflow_edge.config import AT_LEAST_0, COUNT, FRACTION, Span, check_fields

SPANS: dict[str, Span] = {
    "coreset_ratio": FRACTION, "coreset_min": COUNT, "coreset_max": COUNT, "variant_cover": AT_LEAST_0,
    "memory_lists_from": COUNT, "memory_list_size": COUNT, "memory_probe": COUNT,
}  # fmt: skip


@dataclass(frozen=True)
class MemorySettings:
    """How large a memory task's coreset is and how a large one is searched."""

    ARCHITECTURE: ClassVar[tuple[str, ...]] = ()  # a memory task shapes no shared weight

    coreset_ratio: float = 1.0  # kept fraction of the training images' own patches (greedy k-center; 1: all)
    coreset_min: int = 1000  # ... but at least this many (all of them if fewer)
    coreset_max: int = 100_000  # ... and at most this many (a 510-image product; 30 MiB in float16 lists)
    variant_cover: int = 500  # and this many photometric-variant patches, those farthest from the kept ones
    memory_lists_from: int = 25000  # banks of at least this many vectors are searched by inverted lists (cheaper)
    memory_list_size: int = 128  # ... of at most this many vectors each (k-means; a longer list is cut)
    memory_probe: int = 8  # ... of which each patch searches the lists whose centroids are nearest

    def __post_init__(self) -> None:
        check_fields(self, SPANS, "memory")
        if self.coreset_min > self.coreset_max:
            raise ValueError(
                f"config fields memory.coreset_min and memory.coreset_max: {self.coreset_min} > {self.coreset_max}"
            )


Settings = MemorySettings
