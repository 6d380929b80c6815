"""Latency percentiles for a run that lasts months, in fixed memory.

Keeping every frame's latency grows without end (about 0.5 GB a day at 30 fps); a fixed-size
uniform reservoir (Vitter's algorithm R) keeps ``capacity`` samples, every frame equally likely
to be among them, so the percentiles of a long run stay unbiased estimates and exact while the
run is shorter than the reservoir. Seeded, so that a run's summary is reproducible. Torch-free.
"""

from __future__ import annotations

import numpy as np

RESERVOIR_SIZE = 8192  # samples kept per stage: p99 from ~80 samples above it, 64 KiB per stage


class LatencyReservoir:
    """``add`` values one at a time; ``percentiles`` of everything added, from at most ``capacity`` kept."""

    def __init__(self, capacity: int = RESERVOIR_SIZE, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.count = 0  # values added, kept or not
        self._samples = np.empty(capacity, dtype=np.float64)
        self._rng = np.random.default_rng(seed)

    def add(self, value: float) -> None:
        if self.count < self.capacity:
            self._samples[self.count] = value
        else:
            slot = int(self._rng.integers(0, self.count + 1))
            if slot < self.capacity:
                self._samples[slot] = value
        self.count += 1

    @property
    def kept(self) -> int:
        return min(self.count, self.capacity)

    def percentiles(self, qs: tuple[float, ...] = (50, 90, 99)) -> dict[str, float] | None:
        """{"p50": ..., ...} rounded to the microsecond, or None before the first value."""
        if not self.count:
            return None
        values = np.percentile(self._samples[: self.kept], qs)
        return {f"p{q:g}": round(float(v), 3) for q, v in zip(qs, values, strict=True)}
