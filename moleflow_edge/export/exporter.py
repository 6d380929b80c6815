"""export_model: a model directory -> an export directory the runtime can load without torch.

Incremental and crash-safe:
  * every graph records ``source_sha256`` (weights it was made from + export options); a graph
    whose source and file are unchanged is skipped, so re-exporting is a no-op and adding a
    task rebuilds neither the backbone nor any other task;
  * new files are built in a staging folder and committed under new content-addressed names
    (export/commit.py): the manifest swap is the one commit, so an export that fails or is
    killed at any moment leaves the previous export or the new one, never neither;
  * one exporter (or calibration) at a time per export directory (locking.FolderLock).
  * ``fmt="engine"`` then builds TensorRT engines from the committed graphs (tensorrt_engine.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from moleflow_edge import __version__
from moleflow_edge.atomic import check_writable
from moleflow_edge.config import RouterPooling
from moleflow_edge.contract import (
    DETECTOR_DIR,
    MANIFEST_FILE,
    ROUTER_GRAPH,
    ROUTER_WEIGHTS,
    ArtifactFile,
    Manifest,
    ManifestError,
    Precision,
    TaskEntry,
    file_sha256,
    is_signed,
    load_manifest,
)
from moleflow_edge.data.mvtec import DatasetError, Sample, load_images, train_samples
from moleflow_edge.detectors.registry import kind_of
from moleflow_edge.export import onnx_graphs
from moleflow_edge.export.artifacts import ExportError, ExportReport, source_hash
from moleflow_edge.export.commit import ExportRun, remove_stale_staging
from moleflow_edge.export.precision import sensitive_products, to_fp16, to_int8
from moleflow_edge.export.tensorrt_engine import export_engines
from moleflow_edge.features import extract_features
from moleflow_edge.locking import FolderLock
from moleflow_edge.model.continual_model import ContinualModel
from moleflow_edge.model_store import CONFIG_FILE, SHARED_FILE, ModelStore
from moleflow_edge.router import Prototype, RouterTable, router_weights
from moleflow_edge.runtime.trt_api import DEFAULT_BATCH_PROFILE
from moleflow_edge.signing import load_private_key, load_public_keys, sign_from_model, signed_by
from moleflow_edge.targets import ExportFormat, check_export_args

CALIB_LIMIT = 256  # images per INT8 calibration set, evenly spread over the sorted file list


def model_identity(store: ModelStore, model: ContinualModel) -> str:
    """Hash of everything shared: config, shared weights and the backbone's own weights."""
    backbone = [
        t.detach().contiguous().numpy() for _, t in sorted(model.backbone.state_dict().items(), key=lambda kv: kv[0])
    ]
    return source_hash((store.root / CONFIG_FILE).read_bytes(), file_sha256(store.root / SHARED_FILE), *backbone)


def _options(precision: Precision, calibration: str | None = None) -> dict[str, object]:
    """Everything besides weights that changes a graph's bytes."""
    return {
        "precision": precision.value,
        "opset": onnx_graphs.OPSET,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "toolkit": __version__,
        "calibration": calibration,
    }


# --- INT8 calibration sets ------------------------------------------------------------------------


@dataclass(frozen=True)
class CalibrationSet:
    """Normal training images for INT8 calibration, and how to recognise the set again."""

    root: Path
    files: tuple[Path, ...]

    @property
    def record(self) -> dict[str, object]:
        """What the manifest keeps: the count and a hash of the sorted relative file list."""
        names = "\n".join(sorted(p.relative_to(self.root).as_posix() for p in self.files))
        return {"count": len(self.files), "files_sha256": hashlib.sha256(names.encode()).hexdigest()}

    def images(self, size: int) -> np.ndarray:
        return load_images([Sample(p, 0, "good", None) for p in self.files], size)


def calibration_set(root: str | Path, tasks: Sequence[str], limit: int = CALIB_LIMIT) -> CalibrationSet:
    """The sorted train/good images of ``tasks`` under ``root``, evenly thinned to at most ``limit``."""
    root = Path(root)
    files: list[Path] = []
    for task in tasks:
        try:
            files += [s.path for s in train_samples(root, task)]
        except DatasetError as exc:
            raise ExportError(f"INT8 calibration data for task {task!r}: {exc}") from exc
    files.sort()
    if len(files) > limit:
        files = [files[i] for i in np.linspace(0, len(files) - 1, limit).round().astype(int)]
    return CalibrationSet(root, tuple(files))


# --- the export -----------------------------------------------------------------------------------


def export_model(
    model_dir: str | Path,
    out_dir: str | Path,
    tasks: Sequence[str] | None = None,
    precisions: Sequence[str] = ("fp32",),
    fmt: str = "onnx",
    calib_data: str | Path | None = None,
    batch_profile: tuple[int, int, int] = DEFAULT_BATCH_PROFILE,
    sign: str | Path | None = None,
    device_id: int = 0,
    trusted_keys: Sequence[str | Path] = (),
) -> ExportReport:
    """Export ``tasks`` of a model directory into ``out_dir``.

    Writes the shared backbone graph and each task's detector graph (its kind's scorer) per
    precision, and the router over every task in the export. A signed export already in
    ``out_dir`` must verify with the public half of ``sign`` or one of ``trusted_keys`` before
    anything in it is reused or signed again, and is never rewritten unsigned; an unsigned one is
    signed only from the model (``tasks`` None: every graph rebuilt, nothing of it reused, its
    calibration dropped). The ONNX graphs are always traced on the CPU, so a model exports to the
    same bytes whichever device trained it or runs the export.

    Args:
        model_dir: a trained model directory.
        out_dir: the export directory, created or updated incrementally (one commit).
        tasks: the tasks to add or replace (None: every trained task).
        precisions: fp32, fp16 and/or int8.
        fmt: onnx, engine (then TensorRT engines built from those graphs on the target GPU) or
            triton (then a Triton model repository in ``out_dir/triton``).
        calib_data: for int8, a dataset root in the MVTec layout whose <task>/train/good images
            calibrate the QDQ graphs.
        batch_profile: (min, opt, max) batch of the engines' optimisation profile.
        sign: an Ed25519 private key file (moleflow-edge keygen) that signs the manifest.
        device_id: the GPU that builds the engines.
        trusted_keys: public key files an existing signed export may verify with.

    Returns:
        What the run wrote (or found up to date), rebuilt and removed, and its notes.
    """
    export_format, chosen = check_export_args(fmt, precisions)
    if Precision.INT8 in chosen and calib_data is None:
        raise ExportError("int8 export needs calibration images: pass --calib-data ROOT (<task>/train/good inside)")
    if not 1 <= batch_profile[0] <= batch_profile[1] <= batch_profile[2]:
        raise ExportError(f"batch profile must be min <= opt <= max, all >= 1; got {batch_profile}")
    check_writable(out_dir, "--out", directory=True)
    signing_key = None if sign is None else load_private_key(sign)
    trusted = load_public_keys(trusted_keys) if trusted_keys else []
    if signing_key is None and (signers := signed_by(out_dir)):  # manifest or not: a signed folder stays signed
        raise ManifestError(f"{out_dir} is signed: pass --sign KEYFILE so that it stays signed (key {signers[0]})")
    store = ModelStore(model_dir)
    trained = store.tasks()
    wanted = list(trained if tasks is None else dict.fromkeys(tasks))
    unknown = [t for t in wanted if t not in trained]
    if unknown:
        raise ExportError(f"tasks {unknown} are not trained in {model_dir} (trained: {trained})")
    model, prototypes = store.load()
    out = Path(out_dir)
    with FolderLock(out, "export"):
        remove_stale_staging(out)
        identity = model_identity(store, model)
        previous = None
        untrusted = signing_key is not None and (out / MANIFEST_FILE).is_file() and not is_signed(out)
        if untrusted and tasks is not None:
            raise ExportError(f"{out} is not signed, so nothing in it is known good: {sign_from_model(out)}")
        if (out / MANIFEST_FILE).is_file() and not untrusted:  # hashes are checked file by file as each is reused
            previous = load_manifest(out, False, trusted or None, rewrite=True, signing_key=signing_key)
        manifest = _new_manifest(model, identity)
        if previous is not None and previous.model_sha256 == identity:
            manifest.backbone_graphs = dict(previous.backbone_graphs)
            manifest.int8_calibration = dict(previous.int8_calibration)
            manifest.engines = dict(previous.engines)
            manifest.router_file, manifest.router_graph = previous.router_file, previous.router_graph
            manifest.tasks = [TaskEntry(**vars(t)) for t in previous.tasks]
        missing = [t.name for t in manifest.tasks if t.name not in trained]
        if missing:
            raise ExportError(f"{out} holds tasks {missing} that {model_dir} lacks; export into a new --out folder")
        export_tasks = [t for t in trained if t in wanted or t in manifest.task_names]

        run = ExportRun(out, manifest)
        if untrusted:  # signed only from the model: no file, threshold or limit of the unsigned manifest is kept
            run.report.notes.append(f"{out} was not signed: every graph was rebuilt from the model and its "
                                    "calibration dropped; run calibrate --sign KEY again")  # fmt: skip
        try:
            with _quiet_third_party():
                _export_graphs(run, store, model, prototypes, wanted, export_tasks, chosen, calib_data)
            run.commit(signing_key)
        finally:
            run.staging.discard()
        if export_format is ExportFormat.ENGINE:
            export_engines(out, wanted, chosen, batch_profile, run.report, device_id, signing_key)
    return run.report


@contextlib.contextmanager
def _quiet_third_party() -> Iterator[None]:
    """Silence torch/onnx export chatter (tracer, deprecation and dynamo-exporter notes): it says
    nothing to the user, who takes it for problems. The exporter's own checks still raise."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"(torch|onnx|onnxscript|onnxruntime|copyreg)(\.|$)")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


def _new_manifest(model: ContinualModel, identity: str) -> Manifest:
    cfg = model.config
    backbone = model.backbone
    last = cfg.router_pooling is RouterPooling.LAST
    return Manifest(
        backbone=cfg.backbone,
        image_size=cfg.image_size,
        grid=cfg.grid_size,
        embed_dim=cfg.embed_dim,
        routing_dim=backbone.channels_last if last else backbone.channels16,
        top_k=cfg.top_k,
        map_sigma=cfg.map_sigma,
        opset=onnx_graphs.OPSET,
        router_pooling=cfg.router_pooling,
        model_sha256=identity,
        router_limit_quantile=cfg.router_limit_quantile,
        router_limit_margin=cfg.router_limit_margin,
    )


def _export_graphs(
    run: ExportRun,
    store: ModelStore,
    model: ContinualModel,
    prototypes: dict[str, Prototype],
    wanted: list[str],
    export_tasks: list[str],
    precisions: tuple[Precision, ...],
    calib_data: str | Path | None,
) -> None:
    """Stage the backbone graphs, the router and each wanted task's detector graphs, reusing intact ones."""
    manifest, cfg = run.manifest, model.config
    fp32_backbone: list[onnx.ModelProto] = []  # exported at most once per run, and only when needed

    def backbone_fp32() -> onnx.ModelProto:
        if not fp32_backbone:
            fp32_backbone.append(onnx_graphs.backbone_graph(model))
        return fp32_backbone[0]

    int8 = Precision.INT8 in precisions
    backbone_calib = calibration_set(calib_data, export_tasks) if int8 and calib_data else None
    for precision in precisions:
        calib = backbone_calib if precision is Precision.INT8 else None
        source = source_hash(manifest.model_sha256, _options(precision, calib and calib.record))

        def build(precision: Precision = precision, calib: CalibrationSet | None = calib) -> onnx.ModelProto:
            return _graph_in_precision(
                precision,
                backbone_fp32,
                lambda fp32: to_int8(fp32, calib.images(cfg.image_size), nodes_to_exclude=sensitive_products(fp32)),
            )

        old = manifest.backbone_graphs.get(precision)
        manifest.backbone_graphs[precision] = run.artifact(f"backbone.{precision.value}.onnx", old, source, build)
        if calib is not None:
            manifest.int8_calibration["backbone"] = calib.record

    table = RouterTable(export_tasks, [prototypes[t] for t in export_tasks])
    router_source = source_hash(export_tasks, table.stacked, table.shift, _options(Precision.FP32))
    manifest.router_file = run.artifact(
        ROUTER_WEIGHTS, manifest.router_file, router_source, lambda: router_weights(export_tasks, prototypes)
    )
    manifest.router_graph = run.artifact(
        ROUTER_GRAPH, manifest.router_graph, router_source, lambda: onnx_graphs.router_graph(table)
    )

    entries = {t.name: t for t in manifest.tasks}
    for task in wanted:
        entry = entries.get(task) or TaskEntry(task, detector=model.kind(task), distance_limit=prototypes[task].limit)
        entries[task] = _export_task(run, store, model, entry, prototypes[task], precisions, calib_data)
    manifest.tasks = [entries[t] for t in export_tasks]


def _graph_in_precision(
    precision: Precision,
    fp32: Callable[[], onnx.ModelProto],
    int8: Callable[[onnx.ModelProto], onnx.ModelProto],
) -> onnx.ModelProto:
    """One graph in the asked precision: fp16 and INT8 are both derived from the fp32 graph."""
    if precision is Precision.FP32:
        return fp32()
    if precision is Precision.FP16:
        return to_fp16(fp32())
    return int8(fp32())


def _export_task(
    run: ExportRun,
    store: ModelStore,
    model: ContinualModel,
    entry: TaskEntry,
    prototype: Prototype,
    precisions: tuple[Precision, ...],
    calib_data: str | Path | None,
) -> TaskEntry:
    """One task's detector graph per precision (a flow with its adapters fused, or a memory bank);
    other tasks' files are never touched. A kind that is not ``quantizable`` keeps fp32
    arithmetic in an int8 export."""
    cfg = model.config
    kind = kind_of(model.kind(entry.name))
    weights = file_sha256(store.task_file(entry.name))
    built: list[onnx.ModelProto] = []

    def scorer_fp32() -> onnx.ModelProto:
        if not built:
            built.append(onnx_graphs.scorer_graph(kind.scorer(model, entry.name), cfg.embed_dim, cfg.grid_size))
        return built[0]

    def int8(fp32: onnx.ModelProto, calib: CalibrationSet | None) -> onnx.ModelProto:
        if calib is None:  # a kind that is not quantizable: no calibration set, fp32 arithmetic
            return fp32
        return to_int8(fp32, _embeddings(model, calib.images(cfg.image_size)))

    graphs: dict[str, ArtifactFile] = {}
    replaced = False
    for precision in precisions:
        quantized = precision is Precision.INT8 and calib_data is not None and kind.quantizable
        calib = calibration_set(calib_data, [entry.name]) if quantized else None  # only what calibrates a graph
        source = source_hash(run.manifest.model_sha256, weights, _options(precision, calib and calib.record))

        def build(precision: Precision = precision, calib: CalibrationSet | None = calib) -> onnx.ModelProto:
            return _graph_in_precision(precision, scorer_fp32, lambda fp32: int8(fp32, calib))

        old = entry.graphs.get(precision)
        replaced |= old is not None and old.source_sha256 != source
        name = f"{DETECTOR_DIR}/{entry.name}"
        graphs[precision] = run.artifact(f"{name}.{precision.value}.onnx", old, source, build)
        if calib is not None:
            run.manifest.int8_calibration[name] = calib.record
    if replaced:  # the task's weights or export options changed: its other graphs, engines and limits are stale
        return TaskEntry(entry.name, graphs, kind.name, distance_limit=prototype.limit)
    entry.graphs = {**entry.graphs, **graphs}
    return entry


@torch.no_grad()
def _embeddings(model: ContinualModel, images: np.ndarray) -> np.ndarray:
    """A detector graph's input for calibration: (N,D,H,W) float32 embeddings of uint8 BGR images."""
    return model.embed(extract_features(model, images).concat).numpy()
