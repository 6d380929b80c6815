"""The export/runtime contract: the manifest, the graphs' input/output names, Precision.

The exporter writes this contract and the runtime reads it, so it lives apart from both and
imports neither torch nor moleflow_edge.export: the runtime loads it on a line PC. Layout of an
export directory:

    EXPORT/manifest.json
    EXPORT/backbone.<precision>.onnx    uint8 BGR (B,S,S,3) -> embedding (B,D,H,W), routing_feature (B,C)
    EXPORT/router.safetensors           <task>.mean (C,), <task>.whitener (C,C) for every task
    EXPORT/router.onnx                  routing_feature (B,C) -> distances (B,T), every task at once
    EXPORT/flow/<task>.<precision>.onnx embedding (B,D,H,W) -> patch_scores (B,H,W), image_score (B,)
    EXPORT/engines/...                  TensorRT plans, where built

Every file is listed with its sha256; ``load_manifest`` refuses a directory whose files do
not match, so a tampered or half-copied export never runs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path

from moleflow_edge import __version__
from moleflow_edge.atomic import write_text_atomic

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"

# graph input/output names: the contract between exporter and runtime
IMAGES, EMBEDDING, ROUTING_FEATURE = "images", "embedding", "routing_feature"
PATCH_SCORES, IMAGE_SCORE, DISTANCES = "patch_scores", "image_score", "distances"


class Precision(str, Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"


class ManifestError(ValueError):
    """A missing, unreadable, tampered or incompatible export directory."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class ArtifactFile:
    """One file of the export, relative to the export directory, with its hash.

    ``source_sha256`` hashes what the file was made from (weights and options), so that
    re-exporting an unchanged task is recognised and skipped.
    """

    file: str
    sha256: str
    source_sha256: str = ""
    data_file: str | None = None  # external-weights file written beside a large ONNX graph
    data_sha256: str | None = None

    def paths(self) -> list[tuple[str, str]]:
        listed = [(self.file, self.sha256)]
        if self.data_file:
            listed.append((self.data_file, self.data_sha256 or ""))
        return listed


@dataclass
class TaskEntry:
    """One product: its flow graphs per precision, engines, and decision limits."""

    name: str
    graphs: dict[str, ArtifactFile] = field(default_factory=dict)
    engines: dict[str, dict] = field(default_factory=dict)  # engine key -> {"file", "sha256", "precision", ...}
    distance_limit: float = float("inf")  # routing: farther than this from every prototype -> unknown
    threshold: float | None = None  # image-score decision threshold, set by calibrate
    calibration: dict = field(default_factory=dict)  # how threshold and limit were obtained


@dataclass
class Manifest:
    """Everything the runtime needs to know about an export, in one versioned JSON file."""

    backbone: str
    image_size: int
    grid: int
    embed_dim: int
    routing_dim: int
    top_k: int
    map_sigma: float
    opset: int
    router_pooling: str
    backbone_graphs: dict[str, ArtifactFile] = field(default_factory=dict)
    router_file: ArtifactFile | None = None
    router_graph: ArtifactFile | None = None
    tasks: list[TaskEntry] = field(default_factory=list)
    engines: dict[str, dict] = field(default_factory=dict)  # backbone/router engines
    int8_calibration: dict = field(default_factory=dict)  # images used for QDQ graphs: count, list hash
    model_sha256: str = ""  # the shared model (config, shared weights, backbone) every graph here belongs to
    input_layout: str = "NHWC"
    input_dtype: str = "uint8"
    channel_order: str = "BGR"
    format_version: int = FORMAT_VERSION
    toolkit_version: str = __version__

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def task(self, name: str) -> TaskEntry:
        for entry in self.tasks:
            if entry.name == name:
                return entry
        raise ManifestError(f"task {name!r} is not in this export (tasks: {self.task_names})")

    def artifacts(self) -> list[ArtifactFile]:
        listed = [*self.backbone_graphs.values()]
        listed += [a for a in (self.router_file, self.router_graph) if a is not None]
        for entry in self.tasks:
            listed += entry.graphs.values()
        engines = [*self.engines.values(), *(e for entry in self.tasks for e in entry.engines.values())]
        listed += [ArtifactFile(engine["file"], engine["sha256"]) for engine in engines]
        return listed

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        def artifact(d: dict | None) -> ArtifactFile | None:
            return None if d is None else ArtifactFile(**d)

        data = dict(data)
        data["backbone_graphs"] = {k: ArtifactFile(**v) for k, v in data.get("backbone_graphs", {}).items()}
        data["router_file"] = artifact(data.get("router_file"))
        data["router_graph"] = artifact(data.get("router_graph"))
        data["tasks"] = [
            TaskEntry(**{**t, "graphs": {k: ArtifactFile(**v) for k, v in t.get("graphs", {}).items()}})
            for t in data.get("tasks", [])
        ]
        return cls(**data)


def load_manifest(export_dir: str | Path, verify: bool = True) -> Manifest:
    """Read EXPORT/manifest.json; with ``verify``, check every listed file's sha256."""
    root = Path(export_dir)
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(f"{path} is missing: {root} is not an export directory (run moleflow-edge export)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path} is not valid JSON: {exc}") from exc
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ManifestError(
            f"{path} has format version {version}; this toolkit reads version {FORMAT_VERSION}: re-export the model"
        )
    try:
        manifest = Manifest.from_dict(data)
    except TypeError as exc:
        raise ManifestError(f"{path} does not match the manifest format: {exc}") from exc
    if verify:
        verify_files(root, manifest)
    return manifest


def verify_files(root: Path, manifest: Manifest) -> None:
    """Refuse an export whose files are missing or differ from the hashes in the manifest."""
    for artifact in manifest.artifacts():
        for name, expected in artifact.paths():
            path = root / name
            if not path.is_file():
                raise ManifestError(f"{path} is listed in the manifest but missing")
            actual = file_sha256(path)
            if actual != expected:
                raise ManifestError(
                    f"{path} does not match the manifest (sha256 {actual[:12]}..., expected {expected[:12]}...): "
                    "the file was modified or damaged; re-export it"
                )


def save_manifest(export_dir: str | Path, manifest: Manifest) -> None:
    """Replace EXPORT/manifest.json atomically: the old manifest stays valid until the new one is whole."""
    write_text_atomic(Path(export_dir) / MANIFEST_FILE, manifest.to_json())
