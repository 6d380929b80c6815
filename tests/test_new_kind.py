"""A third detector kind is one folder, one registry line and one settings class (docs/architecture.md).

The test applies that recipe to a copy of the package: it adds a toy kind, a per-patch Gaussian
(each patch position's mean and variance over the training images, PaDiM-like with a diagonal
covariance), as ``detectors/gaussian/`` plus one ``DetectorKind`` line, changes nothing else, and
then trains two tasks of it, exports them to ONNX and runs them through the torch-free runtime.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
REGISTRY_LINE = '    GAUSSIAN = "gaussian"\n'

SETTINGS = '''"""The gaussian kind's settings: the ``gaussian`` section of a model's config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from moleflow_edge.config import POSITIVE, check_fields


@dataclass(frozen=True)
class GaussianSettings:
    ARCHITECTURE: ClassVar[tuple[str, ...]] = ()

    variance_floor: float = 1e-3  # added to every patch position's variance

    def __post_init__(self) -> None:
        check_fields(self, {"variance_floor": POSITIVE}, "gaussian")


Settings = GaussianSettings
'''

KIND = '''"""A per-patch Gaussian: each patch position's mean and variance of the embedding over the fit images."""

from __future__ import annotations

import time

import torch

from moleflow_edge.config import DetectorKind
from moleflow_edge.detectors.base import FitOptions, Kind, TaskFit, TrainingSet
from moleflow_edge.model.continual_model import ContinualModel
from moleflow_edge.model.scorer import PatchScorer
from moleflow_edge.router import patch_level


class GaussianParts(PatchScorer):
    def __init__(self, dim: int, grid: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(1, dim, grid, grid))
        self.register_buffer("inverse_variance", torch.ones(1, dim, grid, grid))

    def forward(self, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        patch = 0.5 * ((embedding - self.mean).pow(2) * self.inverse_variance).sum(dim=1)
        return patch, patch.flatten(1).amax(dim=1)


class GaussianKind(Kind):
    name = DetectorKind.GAUSSIAN
    quantizable = False

    def new_parts(self, model: ContinualModel, task: str) -> GaussianParts:
        return GaussianParts(model.config.embed_dim, model.config.grid_size)

    @torch.no_grad()
    def fit(self, model: ContinualModel, task: str, training: TrainingSet, options: FitOptions) -> TaskFit:
        started = time.perf_counter()
        originals = training.concat[0]
        embedded = model.embed(originals[torch.from_numpy(training.fit).to(originals.device)])
        parts = model.per_task[task]
        floor = model.config.section(self.name).variance_floor
        parts.mean.copy_(embedded.mean(dim=0, keepdim=True))
        parts.inverse_variance.copy_(1.0 / (embedded.var(dim=0, keepdim=True) + floor))
        unseen = training.held if len(training.held) else training.fit
        patch, _ = parts(model.embed(originals[torch.from_numpy(unseen).to(originals.device)]))
        level = patch_level(patch.float().cpu().numpy())
        return TaskFit(f"a Gaussian per patch from {len(training.fit)} images", level, time.perf_counter() - started)

    def scorer(self, model: ContinualModel, task: str) -> PatchScorer:
        return model.per_task[task]


KIND = GaussianKind()
'''

# trains, exports and runs in the patched copy; prints what the test checks
SCRIPT = """
import json, sys
from pathlib import Path
import numpy as np
from moleflow_edge.config import MoleFlowConfig
from moleflow_edge.contract import load_manifest
from moleflow_edge.data.mvtec import load_split
from moleflow_edge.detectors.registry import score_images
from moleflow_edge.export.exporter import export_model
from moleflow_edge.metrics import auroc
from moleflow_edge.model_store import ModelStore
from moleflow_edge.runtime.options import RuntimeOptions
from moleflow_edge.runtime.runtime import Runtime
from moleflow_edge.train import train_task

data, work = Path(sys.argv[1]), Path(sys.argv[2])
config = MoleFlowConfig(image_size=128, embed_dim=64, augment_copies=0).with_settings(
    "flow", num_mole_blocks=2, num_dia_blocks=1, lora_rank=8, lora_alpha=8.0, batch_size=8
).with_settings("gaussian", variance_floor=0.01)
tasks = ["weave", "tiles"]
reports = [train_task(data, task, work / "model", config if i == 0 else None, steps=6, progress=False,
                      detector="gaussian") for i, task in enumerate(tasks)]
export_model(work / "model", work / "export", precisions=("fp32",))
model, _ = ModelStore(work / "model").load()
out = {"reports": [r.detector.value for r in reports],
       "manifest": [t.detector for t in load_manifest(work / "export").tasks],
       "tasks_json": json.loads((work / "model" / "tasks.json").read_text()),
       "config": json.loads((work / "model" / "config.json").read_text())}
with Runtime.load(work / "export", RuntimeOptions("onnxruntime")) as runtime:
    for task in tasks:
        split = load_split(data, task, "test", 128)
        results = runtime.infer(split.images, with_maps=False)
        torch_image = score_images(model, split.images, task)[1].numpy()
        runtime_image, _ = runtime.score_as(split.images, task)  # every frame under the task's graph
        good = [r.task for r, label in zip(results, split.labels) if label == 0]
        out[task] = {"good_routed": good, "auroc": auroc(split.labels, runtime_image),
                     "max_rel_diff": float(np.max(np.abs(runtime_image - torch_image) / np.abs(torch_image)))}
print(json.dumps(out))
"""


def apply_recipe(package: Path) -> None:
    """The recipe, applied: one registry line, one folder (parts, fit and scorer; one settings class)."""
    config = package / "config.py"
    text = config.read_text()
    anchor = '    MEMORY = "memory"\n'
    assert text.count(anchor) == 1
    config.write_text(text.replace(anchor, anchor + REGISTRY_LINE))
    folder = package / "detectors" / "gaussian"
    folder.mkdir()
    (folder / "__init__.py").write_text('"""The gaussian kind (a test\'s toy)."""\n')
    (folder / "settings.py").write_text(SETTINGS)
    (folder / "kind.py").write_text(KIND)


@pytest.mark.slow
def test_a_third_kind_added_by_the_recipe_trains_exports_and_runs(synth_root: Path, tmp_path: Path) -> None:
    copy = tmp_path / "src"
    shutil.copytree(REPO / "moleflow_edge", copy / "moleflow_edge", ignore=shutil.ignore_patterns("__pycache__"))
    apply_recipe(copy / "moleflow_edge")
    env = {**os.environ, "PYTHONPATH": str(copy), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(synth_root), str(tmp_path / "work")],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["reports"] == out["manifest"] == ["gaussian", "gaussian"]
    assert out["tasks_json"]["detectors"] == {"weave": "gaussian", "tiles": "gaussian"}
    assert out["config"]["gaussian"] == {"variance_floor": 0.01}  # its settings, a section of their own
    for task in ("weave", "tiles"):
        assert set(out[task]["good_routed"]) == {task}  # good frames reach their task (defects may not)
        assert out[task]["max_rel_diff"] < 1e-4  # the ONNX graph scores as the torch scorer does
        assert out[task]["auroc"] > 0.7, out[task]  # it detects the synthetic defects
