"""What a Triton model repository (`export --format triton`) serves besides its graphs, kept in step
with the export it was written from.

The BLS model ``moleflow`` reads a copy of the export's manifest (thresholds, unknown-product limits,
calibration records) and router weights beside it; ``moleflow_info`` answers with an info.json made from
them. Both are copies, so that the repository can be shipped on its own (a KServe storageUri, an NGC
container's mount); this module writes them. It is torch- and onnx-free, so that ``calibrate``, which
rewrites the manifest on a line PC with the runtime alone, refreshes the repository written from the
export (``EXPORT/triton``) in the same step, and a full Triton started from it (or reloading its models)
serves the new thresholds.

A running Triton picks a rewritten repository up through explicit model control (``--model-control-mode
explicit``), never through polling: the repository is replaced whole by renames and its decision files
one by one, which a poll could catch midway, and Triton does not know that ``moleflow`` calls the graph
models, so a poll could load the new ``moleflow`` before a new task's model. ``pickup_commands`` gives
the load requests in the one safe order: the graph models first (a new task's model is ready before
anything calls it), then ``moleflow_info`` (so that a client which sees a new task set re-reads the new
info), then ``moleflow``. Triton keeps serving a model's old instance until its new one is ready.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

from moleflow_edge.atomic import write_atomic, write_text_atomic
from moleflow_edge.contract import MANIFEST_FILE, ArtifactFile, Manifest, Precision, file_sha256, load_manifest
from moleflow_edge.errors import InputError, UserError
from moleflow_edge.serving.options import BatchOptions
from moleflow_edge.serving.protocol import BACKBONE_MODEL, INFO_MODEL, MODEL, describe, task_model

__all__ = [
    "TRITON_FOLDER",
    "RepositoryOptions",
    "pickup_commands",
    "pickup_order",
    "read_options",
    "refresh_triton_repository",
    "write_decisions",
]

TRITON_FOLDER = "triton"  # EXPORT/triton: where `export --format triton` writes the repository
TRITON_URL = "TRITON_HOST:8000"  # stands for the server's HTTP address in the printed load requests
OPTIONS_FILE = "repository.json"  # beside info.json: the options the repository was written with
INFO_FILE = "info.json"


@dataclass(frozen=True, kw_only=True)
class RepositoryOptions(BatchOptions):
    """How a repository is written: the graphs' precision, dynamic batching and map size (BatchOptions,
    as `serve`'s), and instances per model."""

    precision: str = Precision.FP32.value
    instances: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "precision", Precision(self.precision).value)
        if self.instances < 1:
            raise InputError(f"instances must be >= 1, got {self.instances}")


def version_folder(repo: Path, model: str) -> Path:
    return repo / model / "1"


def write_decisions(export_dir: Path, manifest: Manifest, repo: Path, options: RepositoryOptions) -> None:
    """The manifest and router weights beside ``moleflow``, info.json and the options beside ``moleflow_info``,
    each replaced atomically (a model loading meanwhile reads the old file or the new one, never half)."""
    from moleflow_edge.runtime.options import RuntimeOptions
    from moleflow_edge.runtime.runtime import Runtime

    bls, info = version_folder(repo, MODEL), version_folder(repo, INFO_MODEL)
    assert manifest.router_file is not None  # load_manifest refuses an export without one
    for name in (manifest.router_file.file, MANIFEST_FILE):  # the router first: the manifest names it
        write_atomic(bls / name, partial(shutil.copyfile, export_dir / name))
    with Runtime.load(export_dir, RuntimeOptions("onnxruntime-cpu", options.precision)) as runtime:
        served = describe(runtime, options.max_batch, options.map_side_cap)
    served["description"] = f"Triton model repository, {options.precision}"
    write_text_atomic(info / INFO_FILE, json.dumps(served) + "\n")
    write_text_atomic(info / OPTIONS_FILE, json.dumps(asdict(options)) + "\n")


def read_options(repo: Path) -> RepositoryOptions:
    """The options ``repo`` was written with; ValueError for a folder that is no such repository."""
    path = version_folder(repo, INFO_MODEL) / OPTIONS_FILE
    try:
        return RepositoryOptions(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(
            f"{repo} is not a Triton repository that this version of moleflow-edge wrote ({path}: {exc}); "
            "run `moleflow-edge export --format triton` again"
        ) from None


def _stale_graphs(manifest: Manifest, repo: Path, precision: str) -> list[str]:
    """The repository's models whose graph differs from the one the manifest lists at ``precision``,
    and the tasks one side has and the other lacks."""
    key = Precision(precision)
    wanted: dict[str, ArtifactFile | None] = {BACKBONE_MODEL: manifest.backbone_graphs.get(key)}
    wanted |= {task_model(t.name): t.graphs.get(key) for t in manifest.tasks}
    held = {p.parent.name for p in repo.glob(f"{task_model('*')}/config.pbtxt")}
    stale = sorted(held - set(wanted))
    for model, artifact in wanted.items():
        graph = version_folder(repo, model) / "model.onnx"
        if artifact is None or not graph.is_file() or file_sha256(graph) != artifact.sha256:
            stale.append(model)
    return stale


def refresh_triton_repository(export_dir: str | Path) -> Path | None:
    """After the export's manifest was rewritten: the repository in EXPORT/triton serves it (its decision
    files rewritten; its graphs, which only `export` changes, checked). None where there is no repository;
    ValueError, naming the models, where its graphs are not the export's any more."""
    root = Path(export_dir)
    repo = root / TRITON_FOLDER
    if not repo.exists():
        return None
    options = read_options(repo)
    manifest = load_manifest(root)
    if stale := _stale_graphs(manifest, repo, options.precision):
        raise UserError(
            f"{repo} serves other graphs than {root / MANIFEST_FILE} lists ({', '.join(stale)}), so its "
            "thresholds were not refreshed: run `moleflow-edge export --format triton` again"
        )
    write_decisions(root, manifest, repo, options)
    return repo


def pickup_order(repo: Path, graphs: bool = True) -> list[str]:
    """The models a running Triton (explicit model control) loads, in this order, to serve ``repo`` as
    rewritten: every graph model (``graphs``: after an export; a calibration changes none), then
    ``moleflow_info``, then ``moleflow``, whose BLS calls need the graph models and whose new task set
    makes clients re-read the info."""
    held = sorted(p.parent.name for p in repo.glob("*/config.pbtxt") if p.parent.name not in (MODEL, INFO_MODEL))
    return [*(held if graphs else []), INFO_MODEL, MODEL]


def pickup_commands(repo: Path, graphs: bool = True, url: str = TRITON_URL) -> str:
    """What a command that rewrote ``repo`` prints: the load requests, one curl per line, that make a
    Triton started with ``--model-control-mode explicit`` serve it without a restart."""
    loads = [f"curl -fsS -X POST http://{url}/v2/repository/models/{m}/load" for m in pickup_order(repo, graphs)]
    return "\n".join(
        [f"A Triton serving {repo} (--model-control-mode explicit) picks it up with, in this order:", *loads]
    )
