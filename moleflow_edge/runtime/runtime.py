"""The lean runtime: exported graphs in, per-frame results out, no torch anywhere.

The one routed-inference control flow of the code base: eval and the eager bench run it too, over
the torch backend (moleflow_edge/torch_backend.py) and a trained model directory's RuntimeSpec.

Per batch: each frame is checked and resized once (preprocess.resize_frame), the backbone
runs once for the whole batch, every frame gets its Mahalanobis distance to every task
prototype in one pass, frames beyond every task's distance limit are UNKNOWN, and the rest
are grouped by task so that each task's detector engine runs once per batch. Results come
back in input order, each with its anomaly map at the frame's own resolution.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from moleflow_edge.anomaly_map import anomaly_map, capped_shape
from moleflow_edge.contract import Manifest, ManifestError, Precision, load_manifest
from moleflow_edge.preprocess import FrameError, frame_list, resize_frame
from moleflow_edge.router import UNKNOWN
from moleflow_edge.runtime.backend import Backend, BackendError, FeatureBatch, GraphBackend
from moleflow_edge.runtime.backend_factory import create_backend
from moleflow_edge.runtime.engine_cache import EngineCache, EngineStats
from moleflow_edge.runtime.engine_select import Candidate, EngineChoice, LatencyTargetWarning, select_engine
from moleflow_edge.runtime.options import DEFAULT_MAX_MAP_SIDE, RuntimeOptions
from moleflow_edge.runtime.result import FrameResult
from moleflow_edge.runtime.spec import RuntimeSpec
from moleflow_edge.signing import load_public_keys
from moleflow_edge.targets import resolve_backend

__all__ = ["Runtime"]


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1e3


class Runtime:
    """MoLE-Flow graphs, ready for frames (an InferenceRuntime). Build with Runtime.load (an export), or
    with ``over`` around a spec and a backend of one's own (the Triton BLS model's graphs are calls to
    other models; eval's are the torch model's modules); not thread-safe. ``root`` and ``manifest`` are
    the export's, None otherwise."""

    max_map_side: int | None
    engine_choice: EngineChoice | None
    load_failures: dict[str, str]

    def __init__(
        self,
        spec: RuntimeSpec,
        backend: GraphBackend,
        engines: EngineCache,
        root: Path | None = None,
        manifest: Manifest | None = None,
    ) -> None:
        self.spec = spec
        self.root = root
        self.manifest = manifest
        self.router = spec.router
        self.engines = engines
        self._backend = backend
        self._entries = {entry.name: entry for entry in spec.tasks}
        self.skipped_backends: list[str] = []
        self.max_map_side: int | None = DEFAULT_MAX_MAP_SIDE
        self.load_failures: dict[str, str] = {}  # task -> why its detector graph could not be loaded or run
        self.engine_choice: EngineChoice | None = None  # what a latency target chose, and why
        self.options = RuntimeOptions()  # how it was opened (Runtime.load): a live switch opens the next export alike
        self._owns_backend = True  # False once a successor took the backend over

    @classmethod
    def over(cls, spec: RuntimeSpec, backend: GraphBackend, max_resident_tasks: int | None = None) -> Runtime:
        """A runtime of ``spec``'s tasks whose graphs ``backend`` runs, task engines loaded on first use."""
        engines = EngineCache(lambda task: backend.load_detector(spec.task(task)), max_resident_tasks)
        return cls(spec, backend, engines)

    @classmethod
    def load(
        cls,
        export_dir: str | Path,
        options: RuntimeOptions | None = None,
        *,
        clock: Callable[[], float] = time.perf_counter,
    ) -> Runtime:
        """Check the export (schema, paths, every file's sha256 and, with trusted keys, the
        manifest's signature), choose the engine, then load the backbone and router.

        Args:
            export_dir: the export folder (manifest.json and the graphs it lists).
            options: how to open it (runtime/options.py says what each field does); None: the defaults.
            clock: what the latency-target timing reads (tests pass a fake one).

        Returns:
            The loaded Runtime. Task engines load lazily, on the first frame routed to them
            (``check_graphs`` loads every one once). With a latency target, every candidate precision
            and target is timed first (runtime/engine_select.py; timings cached in EXPORT/engines/) and
            the chosen one is loaded: ``engine_choice`` says what and why, with a LatencyTargetWarning
            when nothing meets it.
        """
        options = RuntimeOptions() if options is None else options
        root = Path(export_dir)
        manifest = cls.check_export(root, options)
        choice = None
        if options.latency_target_ms is not None:
            given = options  # ``options`` is rebound below, to the chosen candidate

            def open_candidate(c: Candidate) -> Runtime:
                return cls._open(root, manifest, given.as_candidate(c.target.name, c.precision))

            choice = select_engine(root, manifest, options, open_candidate, clock=clock)
            options = replace(options, backend=choice.chosen.target.name, precision=choice.chosen.precision)
            if not choice.met:
                warnings.warn(choice.summary(), LatencyTargetWarning, stacklevel=2)
        runtime = cls._open(root, manifest, options)
        runtime.engine_choice = choice
        return runtime

    @staticmethod
    def check_export(root: Path, options: RuntimeOptions) -> Manifest:
        """The export's manifest after every check a load makes (schema, containment, every file's sha256,
        the signature with ``options.trusted_keys``, at least one task): at start and at a live switch."""
        keys = None if options.trusted_keys is None else load_public_keys(options.trusted_keys)
        manifest = load_manifest(root, verify=True, trusted_keys=keys)
        if not manifest.tasks:
            raise ManifestError(f"{root} holds no task: export at least one with moleflow-edge export")
        return manifest

    @classmethod
    def _open(cls, root: Path, manifest: Manifest, options: RuntimeOptions, previous: Runtime | None = None) -> Runtime:
        """Load one engine for a checked manifest: the backend, the router and the engine cache. With
        ``previous`` (a live switch), its backend and warm task engines are taken over where they still
        apply (``successor``); until everything new is loaded, ``previous`` is left as it was."""
        kind, _ = resolve_backend(options.backend)
        prec = options.chosen_precision
        if kind is not Backend.TENSORRT:
            for entry in manifest.tasks:
                if prec not in entry.graphs:
                    raise ManifestError(
                        f"task {entry.name!r} in {root} has no {prec.value} detector graph "
                        f"(has {sorted(p.value for p in entry.graphs)}): export it with --precision {prec.value}"
                    )
        spec = RuntimeSpec.of_export(root, manifest)
        if previous is not None and previous._backend.runs_unchanged(manifest):
            graphs, skipped = previous._backend, previous.skipped_backends
        else:
            graphs, skipped = create_backend(root, manifest, options)
        budget = None if options.memory_budget_mb is None else int(options.memory_budget_mb * 2**20)
        engines = EngineCache(
            lambda task: graphs.load_detector(manifest.task(task)),
            options.max_resident_tasks,
            budget,
            estimate=lambda task: graphs.estimate_bytes(manifest.task(task)),
        )
        if previous is not None:
            previous._hand_over(manifest, graphs, engines)
        runtime = cls(spec, graphs, engines, root, manifest)
        runtime.skipped_backends, runtime.options = skipped, options
        runtime.max_map_side = options.max_map_side
        if options.preload:
            for task in manifest.task_names[: options.max_resident_tasks or None]:
                engines.get(task)
        return runtime

    def successor(self, manifest: Manifest) -> Runtime:
        """The runtime of ``manifest``, newly committed to this export and checked by ``check_export``,
        taking this one's place: opened as this one was, keeping the backend when it runs the new
        manifest unchanged, and with it the loaded task engines whose graph's content address did not
        change; other tasks load lazily, as at start. This runtime is spent afterwards; when opening
        the new one fails it is left as it was and goes on."""
        if self.root is None:
            raise ManifestError("only a runtime loaded from an export (Runtime.load) switches to a newer one")
        runtime = self._open(self.root, manifest, replace(self.options, preload=False), previous=self)
        runtime.engine_choice, runtime.max_map_side = self.engine_choice, self.max_map_side
        return runtime

    def _hand_over(self, manifest: Manifest, backend: GraphBackend, engines: EngineCache) -> None:
        """Give ``engines`` (the successor's) this runtime's warm engines that still apply, close the rest."""
        kept = backend is self._backend
        if kept:
            self._owns_backend = False
            backend.manifest = manifest
        prec = self.precision
        new = {entry.name: entry for entry in manifest.tasks}

        def unchanged(task: str) -> bool:
            old, entry = self._entries[task], new.get(task)
            return entry is not None and old.graphs.get(prec) == entry.graphs.get(prec) and old.engines == entry.engines

        engines.take_over(self.engines, lambda task: kept and unchanged(task))
        self.close()

    def check_graphs(self) -> None:
        """Load every task's detector graph once (the resident cap still applies), so that a graph
        the backend cannot load is found before the first frame, not frame by frame."""
        for task in self.tasks:
            try:
                self.engines.get(task)
            except (BackendError, ManifestError, OSError) as exc:
                self.load_failures[task] = str(exc)
        if self.load_failures:
            raise BackendError(
                "detector graphs that cannot be loaded: "
                + "; ".join(f"{t}: {why}" for t, why in self.load_failures.items())
            )

    @property
    def uncalibrated(self) -> list[str]:
        """Tasks without a threshold at the loaded precision (another's never applies): is_anomaly None."""
        return [entry.name for entry in self.spec.tasks if self.precision not in entry.thresholds]

    def task_status(self) -> dict[str, str]:
        """Per task, at the loaded precision: 'uncalibrated' (and at which precisions it is), or 'calibrated'
        with the expected false-positive rate and whether the requested one was reached, for run's lines."""
        status = {}
        for entry in self.spec.tasks:
            cal = entry.calibrations.get(self.precision)
            if self.precision not in entry.thresholds:
                others = ", ".join(sorted(p.value for p in entry.thresholds))
                elsewhere = f" at {self.precision.value} (calibrated at {others})"
                status[entry.name] = "uncalibrated" + (elsewhere if entry.thresholds else "")
                continue
            fpr = None if cal is None else cal.expected_fpr
            text = "calibrated" if fpr is None else f"calibrated on {cal.n} images, expected FPR {fpr:.3g}"  # type: ignore[union-attr]
            if cal is not None and cal.target_met is False:
                text += f" (the requested {cal.target_fpr} needs more normal images)"
            status[entry.name] = text
        return status

    # --- what was loaded ---------------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        return self.spec.task_names

    @property
    def backend(self) -> Backend:
        return self._backend.kind

    @property
    def graphs(self) -> GraphBackend:
        """The backend that runs the graphs: a runtime ``over`` another spec of the same model shares it."""
        return self._backend

    @property
    def precision(self) -> Precision:
        return self._backend.precision

    @property
    def provider(self) -> str | None:
        """The onnxruntime execution provider the sessions got; None for other engines."""
        return self._backend.provider

    @property
    def device(self) -> str:
        return self._backend.device

    @property
    def description(self) -> str:
        return self._backend.describe()

    @property
    def image_size(self) -> int:
        return self.spec.image_size

    @property
    def engine_stats(self) -> EngineStats:
        return self.engines.stats

    @property
    def resident_tasks(self) -> list[str]:
        return self.engines.resident

    # --- inference ---------------------------------------------------------------------------------
    def infer(self, frames: object, *, with_maps: bool = True, as_task: str | None = None) -> list[FrameResult]:
        """BGR uint8 HxWx3 frame(s) of any size -> one FrameResult per frame, in input order.

        ``frames``: one array, a list of arrays, or a (B,H,W,3) array. A bad frame gets a result
        with ``error`` set and the others go on. ``with_maps=False`` skips the anomaly maps.
        ``as_task`` (oracle eval): every frame is scored by that task's detector and decided by its
        threshold whatever the router says; ``distances`` still say what the router sees.
        """
        if as_task is not None:
            self.spec.task(as_task)  # a ManifestError naming the tasks there are
        items = frame_list(frames)
        results = [FrameResult(index=i) for i in range(len(items))]
        rows: list[int] = []
        resized: list[np.ndarray] = []
        for i, frame in enumerate(items):
            started = time.perf_counter()
            try:
                resized.append(resize_frame(frame, self.spec.image_size))  # type: ignore[arg-type]
                rows.append(i)
                results[i].frame_shape = tuple(frame.shape)  # type: ignore[attr-defined]
            except FrameError as exc:
                results[i].error = str(exc)
            results[i].timings.preprocess = _ms(started)
        step = self._backend.max_batch or len(rows) or 1
        for start in range(0, len(rows), step):
            self._infer_batch(
                [results[i] for i in rows[start : start + step]], resized[start : start + step], with_maps, as_task
            )
        return results

    def infer_one(self, frame: object, *, with_maps: bool = True) -> FrameResult:
        return self.infer([frame], with_maps=with_maps)[0]

    def _infer_batch(
        self, results: list[FrameResult], resized: list[np.ndarray], with_maps: bool, as_task: str | None = None
    ) -> None:
        images = resized[0][None] if len(resized) == 1 else np.stack(resized)
        started = time.perf_counter()
        features = self._backend.backbone(images)
        backbone_ms = _ms(started)

        started = time.perf_counter()
        distances = self._distances(features)
        routed = self.router.assign(distances) if as_task is None else [as_task] * len(results)
        routing_ms = _ms(started)

        groups: dict[str, list[int]] = {}
        unknown: dict[str, list[int]] = {}  # candidate task -> frames beyond every limit it may explain
        candidates = self.router.candidates(distances) if with_maps and UNKNOWN in routed else []
        for k, (result, task) in enumerate(zip(results, routed, strict=True)):
            result.task = task
            result.distances = dict(zip(self.router.tasks, distances[k].tolist(), strict=True))
            result.timings.backbone, result.timings.routing = backbone_ms, routing_ms
            if task != UNKNOWN:
                groups.setdefault(task, []).append(k)
            elif with_maps:
                for candidate in candidates[k]:
                    unknown.setdefault(candidate, []).append(k)

        for task, scored in self._run_tasks(groups, features, results).items():
            for k in groups[task]:
                if scored is None:  # that task's frames fail
                    results[k].error = f"task {task!r}: {self.load_failures[task]}"
                else:
                    results[k].patch_scores, results[k].image_score = scored[k]
        if unknown:
            self._explain_unknown(unknown, candidates, distances, features, results)

        for result in results:
            if result.patch_scores is None or result.error is not None:
                continue
            started = time.perf_counter()
            if result.image_score is not None:
                result.decide(self._entries[result.task].thresholds.get(self.precision))  # type: ignore[index]
            if with_maps:
                result.anomaly_map = anomaly_map(
                    result.patch_scores,
                    self.spec.image_size,
                    self.spec.map_sigma,
                    out_hw=capped_shape(result.frame_shape[:2], self.max_map_side),  # type: ignore[index]
                )
            result.timings.postprocess = _ms(started)

    def _run_tasks(
        self, groups: dict[str, list[int]], features: FeatureBatch, results: list[FrameResult]
    ) -> dict[str, dict[int, tuple[np.ndarray, float]] | None]:
        """Run each task's detector on its batch rows -> per task {row: (patch scores, image score)}, or None
        after a load or run failure (kept in ``load_failures``): the rest of the batch goes on. Every task
        is started before any is collected, so that an engine whose ``start`` only sends the work (the
        Triton BLS backend's) runs them all at once."""
        started: dict[str, tuple[Callable[[], tuple[np.ndarray, np.ndarray]], float, float]] = {}
        scored: dict[str, dict[int, tuple[np.ndarray, float]] | None] = dict.fromkeys(groups)
        for task, members in groups.items():
            begun = time.perf_counter()
            try:
                engine, load_seconds = self.engines.get(task)
                collect = engine.start(features, members)
            except (BackendError, ManifestError, OSError) as exc:
                self.load_failures[task] = str(exc)
                continue
            started[task] = (collect, load_seconds, _ms(begun))
        for task, (collect, load_seconds, start_ms) in started.items():
            begun = time.perf_counter()
            try:
                patch, image = collect()
            except (BackendError, ManifestError, OSError) as exc:
                self.load_failures[task] = str(exc)
                continue
            detector_ms = start_ms + _ms(begun)
            members = groups[task]
            for k in members:
                results[k].timings.detector += detector_ms
                results[k].timings.engine_load += load_seconds * 1e3
            scored[task] = {k: (np.asarray(patch[j], dtype=np.float32), float(image[j])) for j, k in enumerate(members)}
        return scored

    def _explain_unknown(
        self,
        unknown: dict[str, list[int]],
        candidates: list[tuple[str, ...]],
        distances: np.ndarray,
        features: FeatureBatch,
        results: list[FrameResult],
    ) -> None:
        """Frames beyond every limit: each candidate task's detector scores them, and the one that explains
        a frame best (``RouterTable.explaining_task``) gives its patch scores and map. A candidate whose
        detector fails to load drops out; the frame stays a valid unknown, without a map if none is left."""
        scored = self._run_tasks(unknown, features, results)
        by_task = {task: rows for task, rows in scored.items() if rows is not None}
        for k in sorted({k for members in unknown.values() for k in members}):
            named = tuple(t for t in candidates[k] if t in by_task)
            if not named:
                continue
            best = self.router.explaining_task(named, [by_task[t][k][0] for t in named], distances[k])
            results[k].explained_by, results[k].patch_scores = best, by_task[best][k][0]

    def score_as(self, resized: np.ndarray, task: str) -> tuple[np.ndarray, np.ndarray]:
        """Oracle scoring for calibration: (B,S,S,3) resized frames -> image scores (B,) under
        ``task``'s detector, whatever the router says, and distances (B,T) to every prototype."""
        features = self._backend.backbone(resized)
        engine, _ = self.engines.get(task)
        _, image = engine.run(features, list(range(len(resized))))
        return np.asarray(image, dtype=np.float64), self._distances(features)

    def routing_distances(self, resized: np.ndarray) -> np.ndarray:
        """(B,S,S,3) resized frames -> distances (B,T) to every prototype, no detector run: what
        calibration sets routing limits from."""
        return self._distances(self._backend.backbone(resized))

    def _distances(self, features: FeatureBatch) -> np.ndarray:
        if self._backend.routes_on_device:
            distances = np.asarray(self._backend.distances(features), dtype=np.float32)
            if distances.shape != (features.size, len(self.router.tasks)):
                raise BackendError(
                    f"the router graph returned distances of shape {distances.shape}, expected "
                    f"{(features.size, len(self.router.tasks))}: router.onnx is out of date; re-export it"
                )
            return distances
        assert features.routing is not None
        return self.router.distances(features.routing)

    # --- lifetime ----------------------------------------------------------------------------------
    def close(self) -> None:
        """Unload every engine and release the backend's sessions and device memory."""
        self.engines.clear()
        if self._owns_backend:
            self._backend.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
