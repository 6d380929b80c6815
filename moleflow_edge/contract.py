"""The export/runtime contract: the manifest, the graphs' input/output names, Precision.

The exporter writes this contract and the runtime reads it, so it lives apart from both and
imports neither torch nor moleflow_edge.export: the runtime loads it on a line PC. Layout of an
export directory:

    EXPORT/manifest.json
    EXPORT/backbone.<precision>.onnx    uint8 BGR (B,S,S,3) -> embedding (B,D,H,W), routing_feature (B,C)
    EXPORT/router.safetensors           <task>.mean (C,), <task>.whitener (C,C) for every task
    EXPORT/router.onnx                  routing_feature (B,C) -> distances (B,T), every task at once
    EXPORT/detectors/<task>.<precision>.onnx  a task's detector (flow or memory bank, its entry's
                                        ``detector``): embedding (B,D,H,W) -> patch_scores (B,H,W),
                                        image_score (B,); exports made before memory tasks used flow/
    EXPORT/engines/...                  TensorRT plans, where built

File names carry a content hash (``detectors/<task>.<precision>.<sha16>.onnx``), so a new export
never overwrites a file the live manifest lists. ``load_manifest`` refuses, with one line per
problem: a manifest that breaks the schema (types, ranges, required fields, format version), a
listed path that is absolute, not normalised, or resolves outside the export directory, a file
whose sha256 differs (damage, a half copy) or whose content differs from its content-addressed name
(a swap), an unsigned manifest in a folder signed before (a stripped signature) and, where trusted
keys are given, one not signed by one of them (tampering: a hash can be changed with its file).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from moleflow_edge import __version__
from moleflow_edge.atomic import write_text_atomic
from moleflow_edge.config import DetectorKind, MoleFlowConfig
from moleflow_edge.errors import UserError
from moleflow_edge.json_checks import Check, int_at_least, is_object, number, text
from moleflow_edge.signing import SignatureError, checking_keys, record_signer, sign, sign_from_model, signed_by, verify

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
ROUTER_WEIGHTS, ROUTER_GRAPH = "router.safetensors", "router.onnx"  # listed under their content names
DETECTOR_DIR = "detectors"  # each task's detector graphs
LEGACY_DETECTOR_DIR = "flow"  # where exports made before memory tasks keep them (still loaded and swept)
SIGNATURE_FIELD = "signature"  # an Ed25519 signature over the rest of the manifest (see signed_payload)

# graph input/output names: the contract between exporter and runtime
IMAGES, EMBEDDING, ROUTING_FEATURE = "images", "embedding", "routing_feature"
PATCH_SCORES, IMAGE_SCORE, DISTANCES = "patch_scores", "image_score", "distances"


class Precision(str, Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"


class ManifestError(UserError):
    """A missing, unreadable, tampered or incompatible export directory."""


def content_name(relative: str, sha256: str) -> str:
    """flow/a.fp32.onnx + its sha256 -> flow/a.fp32.<first 16 hex digits>.onnx: the name a file is
    listed under, so that a new export never overwrites a file the live manifest lists."""
    pure = PurePosixPath(relative)
    return (pure.parent / f"{pure.stem}.{sha256[:16]}{pure.suffix}").as_posix()


def named_by_content(name: str, sha256: str) -> bool:
    """Whether ``name`` carries the first 16 hex digits of ``sha256`` as content_name writes them."""
    return PurePosixPath(name).stem.endswith("." + sha256[:16])


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
    """One product: its detector's kind and graphs per precision, engines, and decision limits."""

    name: str
    graphs: dict[str, ArtifactFile] = field(default_factory=dict)
    detector: str = DetectorKind.FLOW.value  # flow or memory; the graphs' inputs and outputs are the same
    engines: dict[str, dict] = field(default_factory=dict)  # engine key -> {"file", "sha256", "precision", ...}
    distance_limit: float = float("inf")  # routing: farther than this from every prototype -> unknown
    # precision -> image-score decision threshold, and how it (and the limit) was obtained: set by
    # calibrate --precision P from P's scores, which differ from another precision's
    thresholds: dict[str, float] = field(default_factory=dict)
    calibrations: dict[str, dict] = field(default_factory=dict)
    # precision -> image AUROC that calibrate measured with that precision's graphs (normal + defect
    # images): what latency-target engine selection ranks precisions by
    image_auroc: dict[str, float] = field(default_factory=dict)
    # every value a threshold has had, oldest first: {"value", "precision", "time" (UTC, ISO 8601; null for
    # one set before the history was kept), "reason"}; the last entry per precision is the live one
    threshold_history: list[dict] = field(default_factory=list)


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
    # the model's unknown-product limit rule (router.distance_limit), so that calibrate sets limits by it
    # too; manifests written before it was recorded take the config's defaults
    router_limit_quantile: float = MoleFlowConfig.router_limit_quantile
    router_limit_margin: float = MoleFlowConfig.router_limit_margin
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

    def content_addressed(self) -> list[ArtifactFile]:
        """The graphs and router files: each ``file`` is named by its content (content_name)."""
        listed = [*self.backbone_graphs.values()]
        listed += [a for a in (self.router_file, self.router_graph) if a is not None]
        for entry in self.tasks:
            listed += entry.graphs.values()
        return listed

    def artifacts(self) -> list[ArtifactFile]:
        listed = self.content_addressed()
        engines = [*self.engines.values(), *(e for entry in self.tasks for e in entry.engines.values())]
        listed += [ArtifactFile(engine["file"], engine["sha256"]) for engine in engines]
        return listed

    @property
    def digest(self) -> str:
        """sha256 of what a signature covers (the manifest without its signature): names one committed
        export in the logs and summaries of a live switch, whatever the file's formatting."""
        return hashlib.sha256(signed_payload(asdict(self))).hexdigest()

    def to_json(self, signing_key: Ed25519PrivateKey | None = None) -> str:
        data = asdict(self)
        if signing_key is not None:
            data[SIGNATURE_FIELD] = sign(signed_payload(data), signing_key)
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        def artifact(d: dict | None) -> ArtifactFile | None:
            return None if d is None else ArtifactFile(**d)

        data = dict(data)
        data["backbone_graphs"] = {k: ArtifactFile(**v) for k, v in data.get("backbone_graphs", {}).items()}
        data["router_file"] = artifact(data.get("router_file"))
        data["router_graph"] = artifact(data.get("router_graph"))
        data["tasks"] = [
            TaskEntry(**{**_per_precision(t), "graphs": {k: ArtifactFile(**v) for k, v in t.get("graphs", {}).items()}})
            for t in data.get("tasks", [])
        ]
        return cls(**data)


def _per_precision(task: dict) -> dict:
    """An old manifest's one ``threshold`` and ``calibration`` per task: the precision it was calibrated at."""
    task = dict(task)
    threshold, record = task.pop("threshold", None), task.pop("calibration", None) or {}
    if threshold is not None:
        precision = record.get("precision", Precision.FP32.value)
        task["thresholds"], task["calibrations"] = {precision: threshold}, {precision: record}
    return task


def signed_payload(data: dict) -> bytes:
    """The bytes a signature covers: the manifest without its signature, as canonical JSON."""
    unsigned = {k: v for k, v in data.items() if k != SIGNATURE_FIELD}
    return json.dumps(unsigned, sort_keys=True, separators=(",", ":")).encode()


def load_manifest(
    export_dir: str | Path,
    verify: bool = True,
    trusted_keys: Sequence[Ed25519PublicKey] | None = None,
    *,
    rewrite: bool = False,
    signing_key: Ed25519PrivateKey | None = None,
) -> Manifest:
    """Read EXPORT/manifest.json and check its schema and that every path stays inside the export;
    with ``verify``, check every listed file's sha256 and content-addressed name; with
    ``trusted_keys``, refuse a manifest that is not signed by one of them. An unsigned manifest in a
    folder signed before is refused whatever the keys. ``rewrite`` (to be rewritten, signed with
    ``signing_key``): a signed manifest must verify with those keys and be signed again, so that
    re-signing never launders a tampered export and a rewrite never strips a signature."""
    root = Path(export_dir)
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(f"{path} is missing: {root} is not an export directory (run moleflow-edge export)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ManifestError(f"{path} is not a manifest (a JSON object is expected)")
    signed = data.get(SIGNATURE_FIELD) is not None
    if not signed and (signers := signed_by(root)):
        raise ManifestError(f"{path} is not signed, but {root} was signed before (key {signers[0]}): "
                            f"treated as tampered until rebuilt; {sign_from_model(root)}")  # fmt: skip
    keys = checking_keys(signing_key, trusted_keys or ())
    if trusted_keys is not None or (rewrite and signed):
        if rewrite and signing_key is None:
            raise ManifestError(f"{path} is signed: pass --sign KEYFILE (and --trusted-key KEY.pub for an older "
                                "key) so that it is checked and signed again")  # fmt: skip
        try:
            verify_signature(data, keys)
        except SignatureError as exc:
            raise ManifestError(f"{path} is refused: {exc}") from exc
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ManifestError(
            f"{path} has format version {version!r}; this toolkit reads version {FORMAT_VERSION}: re-export the model"
        )
    problems = schema_problems(data)
    if problems:
        raise ManifestError(f"{path} is refused, {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    manifest = Manifest.from_dict({k: v for k, v in data.items() if k != SIGNATURE_FIELD})
    check_contained(root, manifest)
    if verify:
        verify_files(root, manifest)
    return manifest


def is_signed(export_dir: str | Path) -> bool:
    """Whether EXPORT/manifest.json carries a signature (verified or not); False when it cannot be read."""
    try:
        return json.loads((Path(export_dir) / MANIFEST_FILE).read_text()).get(SIGNATURE_FIELD) is not None
    except (OSError, ValueError, AttributeError):  # AttributeError: JSON that is not an object
        return False


def verify_signature(data: dict, trusted_keys: Sequence[Ed25519PublicKey]) -> str:
    """The id of the trusted key that signed this manifest dict; SignatureError otherwise."""
    if not trusted_keys:
        raise SignatureError("no trusted key was given to check its signature against")
    return verify(signed_payload(data), data.get(SIGNATURE_FIELD), trusted_keys)


def check_contained(root: Path, manifest: Manifest) -> None:
    """Refuse any listed path that is absolute, not normalised (``..``, ``.``, ``//``, ``\\``) or that
    resolves outside the export directory (a symlink out): the runtime reads only its own files."""
    inside = root.resolve()
    for artifact in manifest.artifacts():
        for name, _ in artifact.paths():
            pure = PurePosixPath(name)
            if (
                not name
                or "\\" in name
                or pure.is_absolute()
                or re.match(r"^[A-Za-z]:", name)
                or pure.as_posix() != name
                or any(part in ("..", ".") for part in pure.parts)
            ):
                raise ManifestError(
                    f"manifest entry {name!r} in {root} is not a plain relative path inside the export; "
                    "the export is refused"
                )
            resolved = (root / name).resolve()
            if inside not in resolved.parents:
                raise ManifestError(
                    f"manifest entry {name!r} in {root} resolves to {resolved}, outside the export directory "
                    "(a symlink out?); the export is refused"
                )


def verify_files(root: Path, manifest: Manifest) -> None:
    """Refuse an export whose files are missing, differ from the hashes in the manifest, or (graphs
    and router files) hold content other than their content-addressed name says, signed or not."""
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
    for artifact in manifest.content_addressed():
        if not named_by_content(artifact.file, artifact.sha256):
            raise ManifestError(f"{root / artifact.file} holds content (sha256 {artifact.sha256[:16]}...) other "
                                "than its content-addressed name says: a file swapped in; re-export it")  # fmt: skip


def save_manifest(export_dir: str | Path, manifest: Manifest, signing_key: Ed25519PrivateKey | None = None) -> None:
    """Replace EXPORT/manifest.json atomically (signed with ``signing_key`` when given): the old
    manifest stays valid until the new one is whole; this rename is an export's one commit. A
    signing key's id is then added to SIGNED_MARKER, which outlives a signature deleted later."""
    write_text_atomic(Path(export_dir) / MANIFEST_FILE, manifest.to_json(signing_key))
    if signing_key is not None:
        record_signer(export_dir, signing_key)


# --- schema -----------------------------------------------------------------------------------------
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
def _artifact_problems(where: str, v: object) -> list[str]:
    if not isinstance(v, dict):
        return [f"{where}: must be an object with file and sha256, got {v!r}"]
    problems = [f"{where}: unknown field {k!r}" for k in v if k not in {f.name for f in fields(ArtifactFile)}]
    for key, required in (("file", True), ("sha256", True), ("source_sha256", False)):
        if key not in v:
            problems += [f"{where}: {key} is missing"] if required else []
        elif not isinstance(v[key], str) or (key == "file" and not v[key]):
            problems.append(f"{where}.{key}: must be a non-empty string, got {v[key]!r}")
    if "sha256" in v and isinstance(v["sha256"], str) and not _SHA256.fullmatch(v["sha256"]):
        problems.append(f"{where}.sha256: must be 64 lowercase hex digits, got {v['sha256']!r}")
    if v.get("data_file") is not None and not (
        isinstance(v["data_file"], str) and isinstance(v.get("data_sha256"), str) and _SHA256.fullmatch(v["data_sha256"])
    ):
        problems.append(f"{where}: data_file needs a string name and a 64-hex data_sha256")
    return problems


def _graphs_problems(where: str, v: object) -> list[str]:
    if not isinstance(v, dict):
        return [f"{where}: must be an object precision -> graph, got {type(v).__name__}"]
    precisions = {p.value for p in Precision}
    problems = [f"{where}: unknown precision {k!r} (known: {sorted(precisions)})" for k in v if k not in precisions]
    return problems + [p for k, a in v.items() for p in _artifact_problems(f"{where}.{k}", a)]


def _engines_problems(where: str, v: object) -> list[str]:
    if not isinstance(v, dict):
        return [f"{where}: must be an object, got {type(v).__name__}"]
    problems: list[str] = []
    for key, engine in v.items():
        if not isinstance(engine, dict):
            problems.append(f"{where}[{key!r}]: must be an object, got {engine!r}")
        else:  # engines carry build details besides file and sha256; only those two are read as paths
            problems += _artifact_problems(f"{where}[{key!r}]", {"file": engine.get("file"), "sha256": engine.get("sha256")})
    return problems


def _by_precision(check: Check, what: str) -> Check:
    """A dict precision -> value, every value passing ``check``."""
    precisions = {p.value for p in Precision}

    def checked(v: object) -> str | None:
        ok = isinstance(v, dict) and all(k in precisions and check(x) is None for k, x in v.items())
        return None if ok else f"must map precisions ({', '.join(sorted(precisions))}) to {what}, got {v!r}"

    return checked


def _history(v: object) -> str | None:
    """A threshold history: a list of {value, precision, time, reason}."""
    precisions = {p.value for p in Precision}

    def sound(e: object) -> bool:
        return (
            isinstance(e, dict) and set(e) == {"value", "precision", "time", "reason"}
            and number(-math.inf)(e["value"]) is None and e["precision"] in precisions
            and (e["time"] is None or isinstance(e["time"], str)) and isinstance(e["reason"], str)
        )  # fmt: skip

    if not isinstance(v, list):
        return f"must be a list, got {type(v).__name__}"
    bad = [e for e in v if not sound(e)]
    return f"must hold objects {{value, precision, time, reason}}, got {bad[0]!r}" if bad else None


_TOP: dict[str, Check] = {
    "backbone": text(),
    "image_size": int_at_least(16),
    "grid": int_at_least(1),
    "embed_dim": int_at_least(1),
    "routing_dim": int_at_least(1),
    "top_k": int_at_least(1),
    "map_sigma": number(0.0),
    "opset": int_at_least(1),
    "router_pooling": text(),
    "input_layout": text("NHWC"),
    "input_dtype": text("uint8"),
    "channel_order": text("BGR"),
    "toolkit_version": text(),
    "model_sha256": text(),
    "int8_calibration": is_object,
    "router_limit_quantile": number(0.0, upper=1.0),
    "router_limit_margin": number(0.0),
}
_TASK: dict[str, Check] = {
    "detector": text(*(k.value for k in DetectorKind)),
    "distance_limit": number(0.0, allow_inf=True),
    "threshold": number(-math.inf, optional=True),  # manifests written before thresholds per precision
    "calibration": is_object,
    "thresholds": _by_precision(number(-math.inf), "finite numbers"),
    "calibrations": _by_precision(is_object, "objects"),
    "image_auroc": _by_precision(number(0.0, upper=1.0), "numbers in [0, 1]"),
    "threshold_history": _history,
}


def schema_problems(data: dict) -> list[str]:
    """Every way ``data`` breaks the manifest schema, one message per problem ([] when it is sound)."""
    problems: list[str] = []
    known = {f.name for f in fields(Manifest)} | {SIGNATURE_FIELD}
    problems += [f"unknown field {k!r}" for k in data if k not in known]
    required = [f.name for f in fields(Manifest) if f.default is MISSING and f.default_factory is MISSING]
    problems += [f"{k} is missing" for k in required if k not in data]
    problems += [f"{k}: {msg}" for k, check in _TOP.items() if k in data and (msg := check(data[k]))]
    if "backbone_graphs" in data:
        problems += _graphs_problems("backbone_graphs", data["backbone_graphs"])
    for key in ("router_file", "router_graph"):
        if data.get(key) is not None:
            problems += _artifact_problems(key, data[key])
    problems += _engines_problems("engines", data.get("engines", {}))
    tasks = data.get("tasks", [])
    if not isinstance(tasks, list):
        return [*problems, f"tasks: must be a list, got {type(tasks).__name__}"]
    names: list[object] = []
    task_fields = {f.name for f in fields(TaskEntry)} | {"threshold", "calibration"}  # the last two: old manifests
    for i, task in enumerate(tasks):
        if not isinstance(task, dict):
            problems.append(f"tasks[{i}]: must be an object, got {task!r}")
            continue
        name = task.get("name")
        where = f"task {name!r}" if isinstance(name, str) else f"tasks[{i}]"
        if not isinstance(name, str) or not _TASK_NAME.fullmatch(name):
            problems.append(f"{where}: name must be letters, digits, '_' or '-', got {name!r}")
        elif name in names:
            problems.append(f"{where}: listed twice")
        names.append(name)
        problems += [f"{where}: unknown field {k!r}" for k in task if k not in task_fields]
        problems += [f"{where}.{k}: {msg}" for k, check in _TASK.items() if k in task and (msg := check(task[k]))]
        problems += _graphs_problems(f"{where}.graphs", task.get("graphs", {}))
        problems += _engines_problems(f"{where}.engines", task.get("engines", {}))
    return problems
