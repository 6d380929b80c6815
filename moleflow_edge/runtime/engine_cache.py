"""Per-task detector engines, loaded on first use and kept resident up to a count or a memory budget.

Many products must fit a Jetson: a task's engine is loaded the first time a frame routes
to it, and when the cap is reached the least recently used one leaves first.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from moleflow_edge.runtime.backend import DetectorEngine


@dataclass
class EngineStats:
    """What the cache did: loads and unloads per task, cache hits, seconds spent loading."""

    loads: int = 0
    unloads: int = 0
    hits: int = 0
    load_seconds: dict[str, list[float]] = field(default_factory=dict)
    unloaded: list[str] = field(default_factory=list)  # tasks in the order they left

    def as_dict(self) -> dict[str, object]:
        return {
            "loads": self.loads,
            "unloads": self.unloads,
            "hits": self.hits,
            "load_ms": {t: [round(s * 1e3, 2) for s in v] for t, v in self.load_seconds.items()},
        }


class EngineCache:
    """LRU of loaded detector engines. ``max_resident`` counts engines; ``memory_budget_bytes`` sums their
    estimated_bytes (``estimate`` guesses a task's size before it loads, so room is made first).
    One engine is always allowed, even over the budget, so that every task can run."""

    def __init__(
        self,
        load: Callable[[str], DetectorEngine],
        max_resident: int | None = None,
        memory_budget_bytes: int | None = None,
        estimate: Callable[[str], int] | None = None,
    ) -> None:
        if max_resident is not None and max_resident < 1:
            raise ValueError(f"max_resident_tasks must be >= 1 (or None for no limit), got {max_resident}")
        if memory_budget_bytes is not None and memory_budget_bytes <= 0:
            raise ValueError(f"memory_budget_mb must be > 0 (or None for no limit), got {memory_budget_bytes / 2**20}")
        self._load = load
        self._estimate = estimate or (lambda task: 0)
        self.max_resident = max_resident
        self.memory_budget_bytes = memory_budget_bytes
        self._engines: OrderedDict[str, DetectorEngine] = OrderedDict()
        self.stats = EngineStats()

    @property
    def resident(self) -> list[str]:
        """Loaded tasks, least recently used first."""
        return list(self._engines)

    @property
    def resident_bytes(self) -> int:
        return sum(e.estimated_bytes for e in self._engines.values())

    def get(self, task: str) -> tuple[DetectorEngine, float]:
        """The task's engine and the seconds spent loading it now (0.0 when it was resident)."""
        engine = self._engines.get(task)
        if engine is not None:
            self._engines.move_to_end(task)
            self.stats.hits += 1
            return engine, 0.0
        self._make_room(self._estimate(task))  # before loading: never hold more than the cap
        started = time.perf_counter()
        engine = self._load(task)
        seconds = time.perf_counter() - started
        self.stats.loads += 1
        self.stats.load_seconds.setdefault(task, []).append(seconds)
        self._make_room(engine.estimated_bytes)  # the estimate may have been low
        self._engines[task] = engine
        return engine, seconds

    def _make_room(self, incoming_bytes: int) -> None:
        def over() -> bool:
            if not self._engines:
                return False
            if self.max_resident is not None and len(self._engines) + 1 > self.max_resident:
                return True
            budget = self.memory_budget_bytes
            return budget is not None and self.resident_bytes + incoming_bytes > budget

        while over():
            self.evict(next(iter(self._engines)))

    def take_over(self, previous: EngineCache, keep: Callable[[str], bool]) -> None:
        """Continue ``previous`` (a live switch to a newly committed export): its engines of the tasks
        ``keep`` accepts move here, still warm and in the same LRU order, the others are closed, and
        the stats go on counting. ``previous`` is left empty."""
        self.stats = previous.stats
        for task in previous.resident:
            if keep(task):
                self._engines[task] = previous._engines.pop(task)
            else:
                previous.evict(task)

    def evict(self, task: str) -> None:
        engine = self._engines.pop(task)
        engine.close()
        self.stats.unloads += 1
        self.stats.unloaded.append(task)

    def clear(self) -> None:
        for task in list(self._engines):
            self.evict(task)
