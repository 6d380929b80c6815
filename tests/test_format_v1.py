"""Format version 1 still loads: an export and a model directory as toolkit 0.1.0 wrote them.

The fixtures are made here from recorded text: V1_MANIFEST is manifest.json as 0.1.0 wrote it after
``calibrate --target-fpr 0.1`` and ``calibrate --task tiles --threshold 7.5`` on tests/export_fixture.py's
export, its file names and hashes left as $placeholders that the test fills from this build's files
(the graphs themselves did not change format); V1_TASK_LIST and V1_CONFIG are that model's tasks.json
and config.json. migrations/ reads them; a signature made over a version-1 manifest still verifies.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from string import Template

import pytest

from moleflow_edge.calibration.manifest_update import set_threshold
from moleflow_edge.config import DetectorKind, MoleFlowConfig
from moleflow_edge.contract import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    CalibrationRecord,
    Manifest,
    ManifestError,
    Precision,
    load_manifest,
    schema_problems,
    signed_payload,
)
from moleflow_edge.migrations import FormatVersionError
from moleflow_edge.migrations import manifest as manifest_migration
from moleflow_edge.migrations.manifest import BEFORE_HISTORY
from moleflow_edge.model_store import TASK_LIST_FILE, ModelDirError, ModelStore
from moleflow_edge.preprocess import read_image_bgr
from moleflow_edge.runtime import Runtime, RuntimeOptions
from moleflow_edge.signing import generate_keypair, load_private_key, load_public_keys, record_signer, sign
from tests.export_fixture import TASKS

V1_MANIFEST = Template("""{
  "backbone": "efficientnet_lite0",
  "backbone_graphs": {
    "fp32": {
      "data_file": null,
      "data_sha256": null,
      "file": "$backbone_fp32_file",
      "sha256": "$backbone_fp32_sha256",
      "source_sha256": "$backbone_fp32_source"
    },
    "int8": {
      "data_file": null,
      "data_sha256": null,
      "file": "$backbone_int8_file",
      "sha256": "$backbone_int8_sha256",
      "source_sha256": "$backbone_int8_source"
    }
  },
  "channel_order": "BGR",
  "embed_dim": 64,
  "engines": {},
  "format_version": 1,
  "grid": 8,
  "image_size": 128,
  "input_dtype": "uint8",
  "input_layout": "NHWC",
  "int8_calibration": {
    "backbone": {
      "count": 60,
      "files_sha256": "2d17cd4080f2bf4d717d47eb5000e89934d4188a4c5bfd7d17d5487dfebdf14f"
    },
    "detectors/tiles": {
      "count": 30,
      "files_sha256": "e290f851219c9afbdf73a3a7ee56fed59caadcbeca1604524c9394f7773fc980"
    },
    "detectors/weave": {
      "count": 30,
      "files_sha256": "ba5221614e87fd224697bdf9c276d6c0aea09332cf0052f44738ea792edb9776"
    }
  },
  "map_sigma": 4.0,
  "model_sha256": "$model_sha256",
  "opset": 18,
  "router_file": {
    "data_file": null,
    "data_sha256": null,
    "file": "$router_weights_file",
    "sha256": "$router_weights_sha256",
    "source_sha256": "$router_weights_source"
  },
  "router_graph": {
    "data_file": null,
    "data_sha256": null,
    "file": "$router_graph_file",
    "sha256": "$router_graph_sha256",
    "source_sha256": "$router_graph_source"
  },
  "router_limit_margin": 4.0,
  "router_limit_quantile": 0.99,
  "router_pooling": "stride16",
  "routing_dim": 112,
  "tasks": [
    {
      "calibrations": {
        "fp32": {
          "distance_limit_method": "router rule: 4 x widening 1.00 x the 0.99 quantile of squared Mahalanobis distances of the same images and their JPEG round trips (quality 95, 85, 75, 60)",
          "expected_fpr": 0.08,
          "fpr_upper95": 0.1828924697556409,
          "k": 2,
          "max_normal_distance": 314.46295166015625,
          "n": 24,
          "precision": "fp32",
          "quantile_method": "conformal order statistic: k-th largest, k = floor(target_fpr*(n+1)), E[FPR] = k/(n+1)",
          "source": "weave/test/good",
          "target_fpr": 0.1,
          "target_met": true
        }
      },
      "detector": "flow",
      "distance_limit": 1099.4840820312502,
      "engines": {},
      "graphs": {
        "fp32": {
          "data_file": null,
          "data_sha256": null,
          "file": "$weave_fp32_file",
          "sha256": "$weave_fp32_sha256",
          "source_sha256": "$weave_fp32_source"
        },
        "int8": {
          "data_file": null,
          "data_sha256": null,
          "file": "$weave_int8_file",
          "sha256": "$weave_int8_sha256",
          "source_sha256": "$weave_int8_source"
        }
      },
      "image_auroc": {
        "fp32": 1.0
      },
      "name": "weave",
      "threshold_history": [
        {
          "precision": "fp32",
          "reason": "calibrate: target FPR 0.1 on 24 normal images from weave/test/good",
          "time": "2026-12-07T21:11:22Z",
          "value": 92.96599578857422
        }
      ],
      "thresholds": {
        "fp32": 92.96599578857422
      }
    },
    {
      "calibrations": {
        "fp32": {
          "distance_limit_method": "router rule: 4 x widening 1.00 x the 0.99 quantile of squared Mahalanobis distances of the same images and their JPEG round trips (quality 95, 85, 75, 60)",
          "max_normal_distance": 513.210205078125,
          "precision": "fp32",
          "quantile_method": "set by hand: line trial"
        }
      },
      "detector": "flow",
      "distance_limit": 1938.1935388183597,
      "engines": {},
      "graphs": {
        "fp32": {
          "data_file": null,
          "data_sha256": null,
          "file": "$tiles_fp32_file",
          "sha256": "$tiles_fp32_sha256",
          "source_sha256": "$tiles_fp32_source"
        },
        "int8": {
          "data_file": null,
          "data_sha256": null,
          "file": "$tiles_int8_file",
          "sha256": "$tiles_int8_sha256",
          "source_sha256": "$tiles_int8_source"
        }
      },
      "image_auroc": {
        "fp32": 1.0
      },
      "name": "tiles",
      "threshold_history": [
        {
          "precision": "fp32",
          "reason": "calibrate: target FPR 0.1 on 24 normal images from tiles/test/good",
          "time": "2026-12-07T21:11:23Z",
          "value": 105.7655258178711
        },
        {
          "precision": "fp32",
          "reason": "set by hand: line trial",
          "time": "2026-12-07T21:11:23Z",
          "value": 7.5
        }
      ],
      "thresholds": {
        "fp32": 7.5
      }
    }
  ],
  "toolkit_version": "0.1.0",
  "top_k": 3
}""")

V1_TASK_LIST = """{
  "tasks": [
    "weave",
    "tiles"
  ],
  "detectors": {
    "weave": "flow",
    "tiles": "flow"
  }
}
"""
V1_TASK_LIST_BEFORE_MEMORY = '{"tasks": ["weave", "tiles"]}\n'  # saved before memory tasks: no "detectors"
V1_CONFIG = """{
  "backbone": "efficientnet_lite0",
  "backbone_weights": null,
  "image_size": 128,
  "patch_stride": 16,
  "gain_normalise": true,
  "embed_dim": 64,
  "num_mole_blocks": 2,
  "num_dia_blocks": 1,
  "lora_rank": 8,
  "lora_alpha": 8.0,
  "hidden_ratio": 1.0,
  "clamp": 1.9,
  "scale_context_kernel": 0,
  "positional_encoding": true,
  "spatial_context": false,
  "whitening": "mahalanobis",
  "detector": "flow",
  "coreset_ratio": 0.25,
  "coreset_min": 1000,
  "coreset_max": 3000,
  "memory_lists_from": 25000,
  "memory_list_size": 64,
  "memory_probe": 8,
  "top_k": 3,
  "anomaly_score": "nll",
  "map_sigma": 4.0,
  "lambda_tail": 0.0,
  "tail_fraction": 0.02,
  "lambda_logdet": 0.0001,
  "lr": 0.001,
  "weight_decay": 0.01,
  "dia_lr_factor": 0.5,
  "batch_size": 8,
  "max_steps": 48,
  "holdout_fraction": 0.2,
  "eval_every": 25,
  "patience": 4,
  "feature_noise": 0.15,
  "augment_copies": 0,
  "augment_strength": 0.2,
  "augment_jpeg": false,
  "seed": 0,
  "router_pooling": "stride16",
  "router_covariance": "ledoit_wolf",
  "router_ridge": 1e-05,
  "router_limit_quantile": 0.99,
  "router_limit_margin": 4.0
}
"""


def _artifacts(export_dir: Path) -> dict[str, str]:
    """The $placeholders of V1_MANIFEST, filled from the files of this build's export."""
    manifest = load_manifest(export_dir)
    owners = {"backbone": manifest.backbone_graphs, **{t.name: t.graphs for t in manifest.tasks}}
    listed = {f"{owner}_{p.value}": a for owner, graphs in owners.items() for p, a in graphs.items()}
    listed |= {"router_weights": manifest.router_file, "router_graph": manifest.router_graph}
    values = {"model_sha256": manifest.model_sha256}
    for name, artifact in listed.items():
        values |= {f"{name}_file": artifact.file, f"{name}_sha256": artifact.sha256,
                   f"{name}_source": artifact.source_sha256}  # fmt: skip
    return values


@pytest.fixture
def v1_export(export_copy: Path) -> Path:
    """This build's export with the recorded version-1 manifest.json."""
    (export_copy / MANIFEST_FILE).write_text(V1_MANIFEST.substitute(_artifacts(export_copy)))
    return export_copy


def _frames(data: Path, count: int = 4) -> list:
    return [read_image_bgr(p) for task in TASKS for p in sorted((data / task / "test" / "good").glob("*.png"))[:count]]


def test_a_v1_export_loads_and_runs_with_its_thresholds(v1_export: Path, built: dict) -> None:
    assert json.loads((v1_export / MANIFEST_FILE).read_text())["format_version"] == 1 and FORMAT_VERSION == 2
    manifest = load_manifest(v1_export)  # every file verifies against the recorded hashes
    weave, tiles = manifest.task("weave"), manifest.task("tiles")
    assert manifest.format_version == FORMAT_VERSION and weave.detector is DetectorKind.FLOW
    assert set(weave.graphs) == {Precision.FP32, Precision.INT8} and all(type(p) is Precision for p in weave.graphs)
    assert tiles.thresholds == {Precision.FP32: 7.5}
    assert weave.thresholds[Precision.FP32] == pytest.approx(92.966, abs=1e-3)
    assert weave.calibrations[Precision.FP32].n == 24 and weave.calibrations[Precision.FP32].target_met is True
    assert tiles.calibrations[Precision.FP32] == CalibrationRecord(
        Precision.FP32, "set by hand: line trial", max_normal_distance=513.210205078125,
        distance_limit_method=weave.calibrations[Precision.FP32].distance_limit_method,
    )  # fmt: skip
    assert [(h.value, h.reason) for h in tiles.threshold_history][-1] == (7.5, "set by hand: line trial")
    with Runtime.load(v1_export, RuntimeOptions("onnxruntime")) as runtime:
        assert runtime.uncalibrated == [] and runtime.tasks == TASKS
        results = runtime.infer(_frames(built["data"]), with_maps=False)
    decided = [r for r in results if r.task in TASKS]
    assert decided and all(r.is_anomaly == (r.image_score > r.threshold) for r in decided)
    assert {r.threshold for r in decided if r.task == "tiles"} <= {7.5}


def test_a_signed_v1_export_still_verifies_and_is_rewritten_as_v2(v1_export: Path, tmp_path: Path) -> None:
    private, public = generate_keypair(tmp_path / "key")
    key, trusted = load_private_key(private), load_public_keys([public])
    data = json.loads((v1_export / MANIFEST_FILE).read_text())
    data["signature"] = sign(signed_payload(data), key)  # as 0.1.0 signed: over the version-1 JSON itself
    (v1_export / MANIFEST_FILE).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    record_signer(v1_export, key)
    assert load_manifest(v1_export, trusted_keys=trusted).task("tiles").thresholds == {Precision.FP32: 7.5}
    tampered = {**data, "tasks": [{**data["tasks"][0], "thresholds": {"fp32": 1e9}}, data["tasks"][1]]}
    (v1_export / MANIFEST_FILE).write_text(json.dumps(tampered))
    with pytest.raises(ManifestError, match="changed after signing"):
        load_manifest(v1_export, trusted_keys=trusted)
    (v1_export / MANIFEST_FILE).write_text(json.dumps(data))
    set_threshold(v1_export, "weave", 50.0, sign=private, reason="v2 now")  # checked, then signed again as v2
    rewritten = json.loads((v1_export / MANIFEST_FILE).read_text())
    assert rewritten["format_version"] == FORMAT_VERSION and rewritten["signature"] != data["signature"]
    assert load_manifest(v1_export, trusted_keys=trusted).task("weave").thresholds == {Precision.FP32: 50.0}


@pytest.mark.parametrize("task_list", [V1_TASK_LIST, V1_TASK_LIST_BEFORE_MEMORY], ids=["v1", "before-memory"])
def test_a_v1_model_directory_loads_and_exports(built: dict, tmp_path: Path, task_list: str) -> None:
    from moleflow_edge.export.exporter import export_model

    model = tmp_path / "model"
    shutil.copytree(built["model_dir"], model)
    (model / TASK_LIST_FILE).write_text(task_list)
    (model / "config.json").write_text(V1_CONFIG)
    store = ModelStore(model)
    assert store.tasks() == TASKS and store.kinds() == dict.fromkeys(TASKS, DetectorKind.FLOW)
    export_model(model, tmp_path / "export", precisions=("fp32",))
    frames = _frames(built["data"], 2)
    runs = []
    for export in (tmp_path / "export", built["export_dir"]):  # the same model, read as version 1 and as today's
        with Runtime.load(export, RuntimeOptions("onnxruntime")) as runtime:
            runs.append([(r.task, r.image_score) for r in runtime.infer(frames, with_maps=False)])
    assert len(runs[0]) == len(frames) and runs[0] == runs[1]
    assert json.loads((built["model_dir"] / TASK_LIST_FILE).read_text())["format_version"] == 2  # what is written now


def test_a_task_list_of_an_unknown_version_is_refused(built: dict, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(built["model_dir"], model)
    (model / TASK_LIST_FILE).write_text(json.dumps({"format_version": 7, "tasks": TASKS}))
    with pytest.raises(ModelDirError, match="format version 7; this toolkit reads versions 1, 2"):
        ModelStore(model).tasks()


# --- the upgrade and the schema on the recorded text alone (no files: the fast tier) ----------------
def _dummy_artifacts() -> dict[str, str]:
    names = [f"{o}_{p}" for o in ("backbone", *TASKS) for p in ("fp32", "int8")] + ["router_weights", "router_graph"]
    values = {"model_sha256": "m" * 64}
    for i, name in enumerate(names):
        digest = f"{i:x}" * 64
        values |= {f"{name}_file": f"{name}.{digest[:16]}.onnx", f"{name}_sha256": digest, f"{name}_source": digest}
    return values


def test_the_v1_text_upgrades_to_a_sound_v2_that_reads_back_the_same() -> None:
    data = json.loads(V1_MANIFEST.substitute(_dummy_artifacts()))
    upgraded = manifest_migration.upgrade(data)
    assert data["format_version"] == 1 and upgraded["format_version"] == FORMAT_VERSION  # the input is left as read
    assert schema_problems(upgraded) == []
    manifest = Manifest.from_dict(data)
    assert Manifest.from_dict(json.loads(manifest.to_json())) == manifest
    assert json.loads(manifest.to_json())["tasks"][1]["thresholds"] == {"fp32": 7.5}  # keyed by the precision's name
    assert manifest.task("weave").threshold_history[0].time == "2026-12-07T21:11:22Z"  # kept as recorded


def test_older_v1_forms_upgrade_and_unknown_versions_are_refused() -> None:
    data = json.loads(V1_MANIFEST.substitute(_dummy_artifacts()))
    for key in ("router_limit_quantile", "router_limit_margin"):
        del data[key]
    old = data["tasks"][0]
    for key in ("detector", "thresholds", "calibrations", "threshold_history"):
        del old[key]
    old.update(threshold=1.5, calibration={"n": 10})  # before thresholds per precision: no precision named
    manifest = Manifest.from_dict(data)
    entry = manifest.task("weave")
    assert entry.detector is DetectorKind.FLOW and entry.thresholds == {Precision.FP32: 1.5}
    assert entry.calibrations == {Precision.FP32: CalibrationRecord(Precision.FP32, n=10)}
    assert [(h.value, h.time, h.reason) for h in entry.threshold_history] == [(1.5, None, BEFORE_HISTORY)]
    assert manifest.router_limit_margin == MoleFlowConfig.router_limit_margin
    for version in (0, 3, "2", True, None):
        with pytest.raises(FormatVersionError, match="this toolkit reads versions 1, 2"):
            manifest_migration.upgrade({**data, "format_version": version})


def test_schema_problems_name_each_field_once() -> None:
    data = json.loads(Manifest.from_dict(json.loads(V1_MANIFEST.substitute(_dummy_artifacts()))).to_json())
    data["tasks"][0]["calibrations"]["fp32"]["n"] = 0
    data["tasks"][0]["image_auroc"] = {"fp32": 1.5, "int4": 0.5}
    data["tasks"][1]["detector"] = "gauss"
    data["tasks"][1]["threshold_history"][0]["precision"] = "fp64"
    data["engines"] = {"router/trt10.sm87": {"file": "e.engine", "sha256": "a" * 64}}
    data["tasks"].append(dict(data["tasks"][1]))
    assert schema_problems(data) == [
        "tasks['weave'].calibrations.fp32.n: must be an integer >= 1, got 0",
        "tasks['weave'].image_auroc: unknown precision 'int4' (known: ['fp16', 'fp32', 'int8'])",
        "tasks['weave'].image_auroc.fp32: must be a finite number >= 0 and <= 1, got 1.5",
        *2 * [
            "tasks['tiles'].detector: must be 'flow' or 'memory', got 'gauss'",
            "tasks['tiles'].threshold_history[0].precision: must be 'fp32' or 'fp16' or 'int8', got 'fp64'",
        ],
        *(f"engines.router/trt10.sm87: {name} is missing" for name in
          ("graph_sha256", "precision", "batch_profile", "workspace_bytes", "tensorrt_version", "compute_capability")),
        "tasks['tiles']: listed twice",
    ]  # fmt: skip
