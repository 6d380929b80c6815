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
                                        image_score (B,); version-1 exports may use flow/ instead
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
from dataclasses import asdict, field
from enum import Enum
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from moleflow_edge import __version__
from moleflow_edge.atomic import write_text_atomic
from moleflow_edge.config import DetectorKind, MoleFlowConfig
from moleflow_edge.errors import UserError
from moleflow_edge.json_checks import int_at_least, matching, number, text
from moleflow_edge.migrations import FormatVersionError
from moleflow_edge.migrations import manifest as manifest_migration
from moleflow_edge.schema import build, checked, problems_of, record
from moleflow_edge.signing import SignatureError, checking_keys, record_signer, sign, sign_from_model, signed_by, verify

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

FORMAT_VERSION = manifest_migration.SERVES  # 2; older versions are read by migrations/manifest.py
MANIFEST_FILE = "manifest.json"
ROUTER_WEIGHTS, ROUTER_GRAPH = "router.safetensors", "router.onnx"  # listed under their content names
DETECTOR_DIR = "detectors"  # each task's detector graphs
SIGNATURE_FIELD = "signature"  # an Ed25519 signature over the rest of the manifest (see signed_payload)

# graph input/output names: the contract between exporter and runtime
IMAGES, EMBEDDING, ROUTING_FEATURE = "images", "embedding", "routing_feature"
PATCH_SCORES, IMAGE_SCORE, DISTANCES = "patch_scores", "image_score", "distances"

# the schema's checks beyond a field's type (schema.checked)
SHA256 = matching(r"[0-9a-f]{64}", "64 lowercase hex digits")
NON_EMPTY = matching(r"(?s).+", "a non-empty string")
TASK_NAME = matching(r"[A-Za-z0-9][A-Za-z0-9_-]*", "letters, digits, '_' or '-'")


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


@record
class ArtifactFile:
    """One file of the export, relative to the export directory, with its hash.

    ``source_sha256`` hashes what the file was made from (weights and options), so that
    re-exporting an unchanged task is recognised and skipped.
    """

    file: str = checked(NON_EMPTY)
    sha256: str = checked(SHA256)
    source_sha256: str = ""
    data_file: str | None = None  # external-weights file written beside a large ONNX graph
    data_sha256: str | None = checked(SHA256, default=None)

    def paths(self) -> list[tuple[str, str]]:
        listed = [(self.file, self.sha256)]
        if self.data_file:
            listed.append((self.data_file, self.data_sha256 or ""))
        return listed


@record
class EngineRecord:
    """A TensorRT plan and everything that changes it (its build record): an engine is reused only
    while the record is unchanged (export/tensorrt_engine.py)."""

    file: str = checked(NON_EMPTY)
    sha256: str = checked(SHA256)
    graph_sha256: str = checked(SHA256)
    precision: Precision
    batch_profile: list[int] = checked(items=int_at_least(1))  # noqa: RUF009 (a field()) min, opt, max batch
    workspace_bytes: int = checked(int_at_least(1))
    tensorrt_version: str
    compute_capability: str  # "87" for sm87

    def build(self) -> dict[str, object]:
        """The build record alone (what the engine's file name hashes)."""
        return {k: v for k, v in asdict(self).items() if k not in ("file", "sha256")}


@record
class CalibrationRecord:
    """How one precision's threshold (and the task's routing limit) was obtained. calibrate fills the
    rule's fields; set-threshold keeps only the limit's two and says why in ``quantile_method``."""

    precision: Precision
    quantile_method: str | None = None  # the threshold rule, or "set by hand: <why>"
    n: int | None = checked(int_at_least(1), default=None)  # normal images the threshold rests on
    k: int | None = checked(int_at_least(1), default=None)  # the k-th largest score is the threshold
    target_fpr: float | None = checked(number(0.0, upper=1.0), default=None)
    expected_fpr: float | None = checked(number(0.0, upper=1.0), default=None)
    fpr_upper95: float | None = checked(number(0.0, upper=1.0), default=None)
    target_met: bool | None = None
    source: str | None = None  # the images' folder, relative to the data root, or the frames' source
    distance_limit_method: str | None = None
    max_normal_distance: float | None = None
    # frames taken from a source (good_frames.py, calibration/from_source.py, learn.py)
    frames_read: int | None = None
    frames_taken: int | None = None
    frames_unreadable: int | None = None
    frames_repeated: int | None = None
    frames_assigned_by: str | None = None
    frames_unknown_refused: int | None = None
    frames_held_out: int | None = None
    dataset: str | None = None


@record
class ThresholdChange:
    """One value a threshold has had: the last change per precision is the live threshold."""

    value: float
    precision: Precision
    time: str | None  # UTC, ISO 8601; None for one set before the history was kept
    reason: str


@record
class TaskEntry:
    """One product: its detector's kind and graphs per precision, engines, and decision limits."""

    name: str = checked(TASK_NAME)
    graphs: dict[Precision, ArtifactFile] = field(default_factory=dict)
    detector: DetectorKind = DetectorKind.FLOW  # the graphs' inputs and outputs are the same for every kind
    engines: dict[str, EngineRecord] = field(default_factory=dict)  # "<precision>/<device>" -> plan
    # routing: a frame farther than this from every prototype is of no known product
    distance_limit: float = checked(number(0.0, allow_inf=True), default=math.inf)
    # precision -> image-score decision threshold, and how it (and the limit) was obtained: set by
    # calibrate --precision P from P's scores, which differ from another precision's
    thresholds: dict[Precision, float] = field(default_factory=dict)
    calibrations: dict[Precision, CalibrationRecord] = field(default_factory=dict)
    # precision -> image AUROC that calibrate measured with that precision's graphs (normal + defect
    # images): what latency-target engine selection ranks precisions by
    image_auroc: dict[Precision, float] = checked(items=number(0.0, upper=1.0), default_factory=dict)  # noqa: RUF009
    threshold_history: list[ThresholdChange] = field(default_factory=list)  # oldest first


def find_task(tasks: Sequence[TaskEntry], name: str, where: str) -> TaskEntry:
    """The entry of task ``name``; ManifestError naming the tasks there are (``where``: "in this export")."""
    for entry in tasks:
        if entry.name == name:
            return entry
    raise ManifestError(f"task {name!r} is not {where} (tasks: {[t.name for t in tasks]})")


@record
class Manifest:
    """Everything the runtime needs to know about an export, in one versioned JSON file."""

    backbone: str
    image_size: int = checked(int_at_least(16))
    grid: int = checked(int_at_least(1))
    embed_dim: int = checked(int_at_least(1))
    routing_dim: int = checked(int_at_least(1))
    top_k: int = checked(int_at_least(1))
    map_sigma: float = checked(number(0.0))
    opset: int = checked(int_at_least(1))
    router_pooling: str
    backbone_graphs: dict[Precision, ArtifactFile] = field(default_factory=dict)
    router_file: ArtifactFile | None = None
    router_graph: ArtifactFile | None = None
    tasks: list[TaskEntry] = field(default_factory=list)
    engines: dict[str, EngineRecord] = field(default_factory=dict)  # "backbone.<precision>/<device>", "router/<device>"
    int8_calibration: dict = field(default_factory=dict)  # images used for QDQ graphs: count, list hash
    model_sha256: str = ""  # the shared model (config, shared weights, backbone) every graph here belongs to
    # the model's unknown-product limit rule (router.distance_limit), so that calibrate sets limits by it too
    router_limit_quantile: float = checked(number(0.0, upper=1.0), default=MoleFlowConfig.router_limit_quantile)
    router_limit_margin: float = checked(number(0.0), default=MoleFlowConfig.router_limit_margin)
    input_layout: str = checked(text("NHWC"), default="NHWC")
    input_dtype: str = checked(text("uint8"), default="uint8")
    channel_order: str = checked(text("BGR"), default="BGR")
    format_version: int = FORMAT_VERSION
    toolkit_version: str = __version__

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def task(self, name: str) -> TaskEntry:
        return find_task(self.tasks, name, "in this export")

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
        listed += [ArtifactFile(engine.file, engine.sha256) for engine in engines]
        return listed

    @property
    def digest(self) -> str:
        """sha256 of what a signature covers (the manifest without its signature): names one committed
        export in the logs and summaries of a live switch, whatever the file's formatting."""
        return hashlib.sha256(signed_payload(asdict(self))).hexdigest()

    def to_json(self, signing_key: Ed25519PrivateKey | None = None) -> str:
        data = asdict(self)  # Precision and DetectorKind are str Enums: JSON writes their names
        if signing_key is not None:
            data[SIGNATURE_FIELD] = sign(signed_payload(data), signing_key)
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        """A manifest's JSON object, of any format version this toolkit reads, without its signature."""
        return build(cls, manifest_migration.upgrade({k: v for k, v in data.items() if k != SIGNATURE_FIELD}))


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
    try:  # after the signature check: a signature covers the manifest as it was written
        data = manifest_migration.upgrade({k: v for k, v in data.items() if k != SIGNATURE_FIELD})
    except FormatVersionError as exc:
        raise ManifestError(f"{path} {exc}") from exc
    problems = schema_problems(data)
    if problems:
        raise ManifestError(f"{path} is refused, {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    manifest = build(Manifest, data)
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


def schema_problems(data: dict) -> list[str]:
    """Every way ``data`` (a manifest in the current format) breaks the declarations above, one message
    per problem ([] when it is sound); a task name listed twice is one too."""
    problems = problems_of(Manifest, data, extra=frozenset({SIGNATURE_FIELD}))
    tasks = data.get("tasks")
    names = [t.get("name") for t in tasks if isinstance(t, dict)] if isinstance(tasks, list) else []
    return problems + [f"tasks[{n!r}]: listed twice" for n in sorted({n for n in names if names.count(n) > 1}, key=str)]
